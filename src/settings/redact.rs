//! Secrets kept out of logs, errors and `Debug`: passwords in database URLs, in libpq
//! `key=value` strings and in free text, and librdkafka properties that hold secrets.

/// The database URL (`postgres://…` or `postgresql://…`, or a libpq `key=value` string) with every
/// password replaced by `***`, for logs and errors: the one in the user part of a URL, and any
/// `password=` (or `sslpassword=`, …) parameter in its query or in the `key=value` string, whatever
/// its case or percent-encoding.
pub fn redact_url(url: &str) -> String {
    if !url.contains("://") {
        return redact_parameters(url);
    }
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            redact_parameters(parsed.as_str())
        }
        Err(_) => "<unparsable database url>".to_string(),
    }
}

/// Replaces anything that looks like a password in free text: a URL password (`://user:secret@`)
/// and the value of any `password=` parameter (`?password=secret&…`, `password = 'se cret'`).
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme_end + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', ' ', '"', '\'', '\n']).unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    redact_parameters(&out)
}

/// Whether the name of a `name=value` parameter (a URL query's or a libpq `key=value` string's)
/// names a secret: it contains `password` once percent-decoded, in any case. libpq and
/// tokio-postgres read percent-encoded names in URLs, so `pass%77ord` is a password too.
fn is_password_parameter(name: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    decoded.to_ascii_lowercase().contains("password")
}

/// Replaces the value of every `name=value` parameter whose name is a password's
/// ([`is_password_parameter`]) by `***`. A name is the run of letters, digits and `_%.-` before the
/// `=` (spaces allowed around it, as in libpq's `key = value`); a value is quoted (`'…'`, with
/// backslash escapes) or runs up to a space, `&` or `"` (more is masked rather than less).
fn redact_parameters(text: &str) -> String {
    let is_name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '%' | '.' | '-');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(equals) = rest.find('=') {
        let before = rest[..equals].trim_end();
        let name_start = before.rfind(|c: char| !is_name(c)).map_or(0, |at| at + 1);
        out.push_str(&rest[..=equals]);
        rest = &rest[equals + 1..];
        if !is_password_parameter(&before[name_start..]) {
            continue;
        }
        let value = rest.trim_start();
        out.push_str(&rest[..rest.len() - value.len()]);
        let mut chars = value.char_indices();
        let quoted = value.starts_with('\'');
        if quoted {
            chars.next();
        }
        let mut end = value.len();
        while let Some((at, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '\'' if quoted => {
                    end = at + 1;
                    break;
                }
                c if !quoted && (c.is_whitespace() || c == '&' || c == '"') => {
                    end = at;
                    break;
                }
                _ => {}
            }
        }
        out.push_str("***");
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

/// Whether librdkafka property `name` holds a secret (shown as `***`).
pub(super) fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("password")
        || name.contains("secret")
        || name.ends_with(".key.pem")
        || name.contains("sasl.oauthbearer.config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_text_masks_urls_in_messages() {
        let text = "cannot connect to postgres://app:s3cret@db/reads: refused";
        assert_eq!(redact_text(text), "cannot connect to postgres://app:***@db/reads: refused");
        assert_eq!(redact_text("no url here"), "no url here");
    }

    #[test]
    fn redact_url_masks_passwords_in_the_query_and_in_key_value_strings() {
        for (url, shown) in [
            ("postgres://u@h/db?password=secret&sslmode=disable", "postgres://u@h/db?password=***&sslmode=disable"),
            (
                "postgresql://u@h:5433/db?sslmode=require&password=secret",
                "postgresql://u@h:5433/db?sslmode=require&password=***",
            ),
            ("postgres://u:secret@h/db?PASSWORD=secret", "postgres://u:***@h/db?PASSWORD=***"),
            (
                "postgres://u@h/db?Password=s%65cret%26more&application_name=x",
                "postgres://u@h/db?Password=***&application_name=x",
            ),
            ("postgres://u@h/db?pass%77ord=secret", "postgres://u@h/db?pass%77ord=***"),
            ("postgres://u@h/db?sslpassword=secret", "postgres://u@h/db?sslpassword=***"),
            ("host=h user=u password=secret dbname=db", "host=h user=u password=*** dbname=db"),
            ("host=h PassWord = secret dbname=db", "host=h PassWord = *** dbname=db"),
            ("host=h password='se\\'cret with spaces' dbname=db", "host=h password=*** dbname=db"),
            ("password=secret", "password=***"),
            ("host=h dbname=db", "host=h dbname=db"),
            ("postgres://u@h/db?sslmode=disable", "postgres://u@h/db?sslmode=disable"),
        ] {
            let redacted = redact_url(url);
            assert_eq!(redacted, shown, "{url}");
            assert!(!redacted.contains("secret") && !redacted.contains("s%65cret"), "{url} shown as {redacted}");
        }
    }

    #[test]
    fn redact_text_masks_password_parameters_in_messages() {
        let text = "invalid connection string `host=db password=secret port=x`: \
                    postgresql://app@db/reads?password=s3cret&sslmode=require refused; password authentication failed";
        let redacted = redact_text(text);
        assert!(!redacted.contains("secret") && !redacted.contains("s3cret"), "{redacted}");
        assert!(redacted.contains("host=db password=*** port=x"), "{redacted}");
        assert!(
            redacted.contains("reads?password=***&sslmode=require refused; password authentication failed"),
            "{redacted}"
        );
    }
}
