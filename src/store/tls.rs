//! Postgres connection settings from a URL, with TLS chosen by `sslmode` as libpq does:
//!
//! | `sslmode`             | encrypted                 | server certificate checked            |
//! |-----------------------|---------------------------|---------------------------------------|
//! | `disable`             | no                        | -                                     |
//! | `prefer` (default)    | when the server offers it | no                                    |
//! | `require`             | yes                       | no (with `sslrootcert`: as verify-ca) |
//! | `verify-ca`           | yes                       | signed by `sslrootcert` (or the system roots) |
//! | `verify-full`         | yes                       | as verify-ca, and it names the host   |
//!
//! TLS is OpenSSL's, through `native-tls` and `postgres-native-tls`.

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use postgres_native_tls::MakeTlsConnector;

use super::StoreError;
use crate::settings::redact_text;

/// How a URL asks for TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A parsed connection URL and the TLS connector its `sslmode` asks for.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: MakeTlsConnector,
    pub mode: SslMode,
}

/// Parses `url` (`postgres://user:password@host:port/db?sslmode=…&sslrootcert=…`).
pub fn target(url: &str) -> Result<Target, StoreError> {
    let invalid = |message: String| StoreError::Url(redact_text(&message));
    let mut mode = SslMode::Prefer;
    let mut root_cert: Option<String> = None;
    // tokio-postgres knows `disable`, `prefer` and `require`, and no `sslrootcert`: those are read
    // here and the URL handed on without them.
    let passed_on = match url::Url::parse(url) {
        Ok(mut parsed) if parsed.scheme().starts_with("postgres") => {
            let mut kept: Vec<(String, String)> = Vec::new();
            for (name, value) in parsed.query_pairs() {
                match name.as_ref() {
                    "sslmode" => {
                        mode = match value.as_ref() {
                            "disable" => SslMode::Disable,
                            "allow" | "prefer" => SslMode::Prefer,
                            "require" => SslMode::Require,
                            "verify-ca" => SslMode::VerifyCa,
                            "verify-full" => SslMode::VerifyFull,
                            other => return Err(invalid(format!("unknown sslmode `{other}`"))),
                        }
                    }
                    "sslrootcert" => root_cert = Some(value.into_owned()),
                    _ => kept.push((name.into_owned(), value.into_owned())),
                }
            }
            let wire_mode = match mode {
                SslMode::Disable => "disable",
                SslMode::Prefer => "prefer",
                _ => "require",
            };
            kept.push(("sslmode".into(), wire_mode.into()));
            // Percent-encoded, not form-encoded: tokio-postgres reads `+` as a plus sign, so a
            // space in `options=-c%20…` must stay `%20`.
            let query: Vec<String> = kept
                .iter()
                .map(|(name, value)| {
                    let encode = |text: &str| utf8_percent_encode(text, NON_ALPHANUMERIC).to_string();
                    format!("{}={}", encode(name), encode(value))
                })
                .collect();
            parsed.set_query(Some(&query.join("&")));
            parsed.to_string()
        }
        // A key=value string: tokio-postgres reads it as it is.
        _ => url.to_string(),
    };
    let config = passed_on.parse::<tokio_postgres::Config>().map_err(|error| invalid(error.to_string()))?;
    if mode == SslMode::Require && root_cert.is_some() {
        mode = SslMode::VerifyCa;
    }

    // Building a connector reads the system's certificates (tens of milliseconds): once per
    // process for each mode and root certificate, not once per connection pool or client.
    static CONNECTORS: std::sync::OnceLock<
        std::sync::Mutex<Vec<((SslMode, Option<String>), native_tls::TlsConnector)>>,
    > = std::sync::OnceLock::new();
    let connectors = CONNECTORS.get_or_init(Default::default);
    let key = (mode, root_cert.clone());
    let known = connectors.lock().expect("TLS connectors").iter().find(|(k, _)| *k == key).map(|(_, c)| c.clone());
    let connector = match known {
        Some(connector) => connector,
        None => {
            let connector = connector(mode, root_cert.as_deref()).map_err(invalid)?;
            connectors.lock().expect("TLS connectors").push((key, connector.clone()));
            connector
        }
    };
    Ok(Target { config, tls: MakeTlsConnector::new(connector), mode })
}

/// A TLS connector checking the server's certificate as `mode` says.
fn connector(mode: SslMode, root_cert: Option<&str>) -> Result<native_tls::TlsConnector, String> {
    let mut builder = native_tls::TlsConnector::builder();
    match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            builder.danger_accept_invalid_certs(true).danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyCa => {
            builder.danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyFull => {}
    }
    if let Some(path) = root_cert {
        let pem = std::fs::read(path).map_err(|error| format!("sslrootcert `{path}`: {error}"))?;
        let certificate = native_tls::Certificate::from_pem(&pem)
            .map_err(|error| format!("sslrootcert `{path}` is not a PEM certificate: {error}"))?;
        builder.add_root_certificate(certificate);
    }
    let connector = builder.build().map_err(|error| format!("TLS: {error}"))?;
    Ok(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_from_the_url() {
        let mode = |url: &str| target(url).map(|target| target.mode).map_err(|error| error.to_string());
        assert_eq!(mode("postgres://u@h/db"), Ok(SslMode::Prefer));
        assert_eq!(mode("postgres://u@h/db?sslmode=disable"), Ok(SslMode::Disable));
        assert_eq!(mode("postgres://u@h/db?sslmode=require"), Ok(SslMode::Require));
        assert_eq!(mode("postgres://u@h/db?sslmode=verify-full"), Ok(SslMode::VerifyFull));
        assert_eq!(mode("postgres://u@h/db?sslmode=verify-ca&application_name=x"), Ok(SslMode::VerifyCa));
        assert!(mode("postgres://u@h/db?sslmode=sometimes").unwrap_err().contains("unknown sslmode `sometimes`"));
        let missing = mode("postgres://u:hunter2@h/db?sslmode=require&sslrootcert=/nonexistent.pem").unwrap_err();
        assert!(missing.contains("sslrootcert `/nonexistent.pem`"), "{missing}");
        assert!(!missing.contains("hunter2"));
        let config = target("postgres://u@h:5433/db?sslmode=verify-full&application_name=x").unwrap().config;
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(config.get_application_name(), Some("x"));
        assert_eq!(config.get_ports(), [5433]);
        // Spaces in `options` survive the rewrite of the query.
        let config =
            target("postgres://u@h/db?options=-c%20search_path%3Dshadow%2Cpublic&sslmode=require").unwrap().config;
        assert_eq!(config.get_options(), Some("-c search_path=shadow,public"));
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }
}
