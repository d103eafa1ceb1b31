//! `projector parked list|show|retry|skip`: the operator's view of events that could not be
//! applied, and the two ways out (re-apply after a fix, or discard with a reason).

use comfy_table::{presets, Table};

use crate::projection::Projection;
use crate::settings::Settings;
use crate::store::parked::{self, Filter, Parked, ParkedError, Retried, Selection};
use crate::store::{self, StoreError};

async fn client(settings: &Settings) -> Result<deadpool_postgres::Object, StoreError> {
    let pool = store::connect(&settings.database.url, 1).await?;
    crate::store::client(&pool).await
}

/// At most `width` characters of `text`, on one line.
fn cut(text: &str, width: usize) -> String {
    let line = text.replace(['\n', '\r'], " ");
    match line.char_indices().nth(width) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line,
    }
}

pub async fn list(settings: &Settings, filter: &Filter, json: bool) -> Result<String, StoreError> {
    let client = client(settings).await?;
    let events = parked::list(&**client, filter).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&events).expect("serializable") + "\n");
    }
    if events.is_empty() {
        return Ok("no parked events\n".into());
    }
    let mut table = Table::new();
    table.load_preset(presets::UTF8_FULL_CONDENSED);
    table.set_header(["id", "projection", "key", "type", "at", "class", "state", "parked at", "error"]);
    for event in &events {
        table.add_row([
            event.id.to_string(),
            event.projection.clone(),
            event.entity_key.clone().unwrap_or_default(),
            event.event_type.clone().unwrap_or_default(),
            format!("{}/{}@{}", event.topic, event.partition, event.offset),
            event.error_class.clone(),
            event.state.clone(),
            event.parked_at.chars().take(19).collect(),
            cut(&event.error, 70),
        ]);
    }
    Ok(format!("{table}\n{} event(s)\n", events.len()))
}

/// Bytes shown to a person, faithfully: UTF-8 text as it is, with control characters (a NUL, an
/// escape sequence) written as escapes; anything else in hex. Cut at 4 KiB, saying how long it was.
/// A text that starts with `(` is written with escapes too, so that no text reads as `(none)`, as
/// escapes or as hex: every display is read back to one value.
pub fn shown_bytes(bytes: Option<&[u8]>) -> String {
    const LIMIT: usize = 4096;
    let Some(bytes) = bytes else {
        return "(none)".into();
    };
    let part = &bytes[..bytes.len().min(LIMIT)];
    // A cut through a character is still text: the bytes after the last whole one are dropped.
    let text = match std::str::from_utf8(part) {
        Ok(text) => Some(text),
        Err(error) if bytes.len() > LIMIT && error.error_len().is_none() => {
            std::str::from_utf8(&part[..error.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    let mut shown = match text {
        Some(text) if text.starts_with('(') || text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t')) => {
            let escaped: String = text
                .chars()
                .map(|c| match c {
                    '\n' | '\t' => c.to_string(),
                    c if c.is_control() => c.escape_unicode().to_string(),
                    '\\' => "\\\\".to_string(),
                    c => c.to_string(),
                })
                .collect();
            format!("(escaped) {escaped}")
        }
        Some(text) => text.to_string(),
        None => format!("(not UTF-8) 0x{}", part.iter().map(|byte| format!("{byte:02x}")).collect::<String>()),
    };
    if bytes.len() > LIMIT {
        shown.push_str(&format!("… ({} bytes in all)", bytes.len()));
    }
    shown
}

pub async fn show(settings: &Settings, id: i64, json: bool) -> Result<Option<String>, StoreError> {
    let client = client(settings).await?;
    let Some((event, actions)) = parked::show(&**client, id).await? else {
        return Ok(None);
    };
    if json {
        let value = serde_json::json!({
            "event": event,
            "record_key": event.record.key.as_deref().map(|key| shown_bytes(Some(key))),
            "record_value": shown_bytes(event.record.value.as_deref()),
            "headers": event.record.headers.iter().map(|(name, value)| (shown_bytes(Some(name)), shown_bytes(value.as_deref()))).collect::<Vec<_>>(),
            "timestamp_ms": event.record.timestamp_ms,
            "actions": actions,
        });
        return Ok(Some(serde_json::to_string_pretty(&value).expect("serializable") + "\n"));
    }
    let Parked { record, .. } = &event;
    let mut out = String::new();
    let mut line = |name: &str, value: String| out.push_str(&format!("{name:<16}{value}\n"));
    line("id", event.id.to_string());
    line("projection", event.projection.clone());
    line("state", format!("{} (attempts: {})", event.state, event.attempts));
    line("class", event.error_class.clone());
    line("error", event.error.clone());
    line("key", event.entity_key.clone().unwrap_or_else(|| "(none)".into()));
    line("event type", event.event_type.clone().unwrap_or_else(|| "(unreadable)".into()));
    line("record", format!("{} partition {} offset {}", event.topic, event.partition, event.offset));
    line("timestamp", record.timestamp_ms.map_or("(none)".into(), |ms| ms.to_string()));
    line("parked at", event.parked_at.clone());
    line("definition", event.definition_hash.clone());
    if let Some(resolved_at) = &event.resolved_at {
        line("resolved at", format!("{resolved_at} ({})", event.resolution.clone().unwrap_or_default()));
    }
    line("record key", shown_bytes(record.key.as_deref()));
    for (name, value) in &record.headers {
        line("header", format!("{} = {}", shown_bytes(Some(name)), shown_bytes(value.as_deref())));
    }
    line("value", shown_bytes(record.value.as_deref()));
    for action in &actions {
        let reason = action.reason.as_deref().map(|reason| format!(" ({reason})")).unwrap_or_default();
        line("action", format!("{} {} by {}: {}{reason}", action.acted_at, action.action, action.actor, action.result));
    }
    Ok(Some(out))
}

pub async fn retry(
    settings: &Settings,
    projection: &Projection,
    selection: &Selection,
) -> Result<Vec<Retried>, ParkedError> {
    let mut client = client(settings).await?;
    parked::retry(&mut client, projection, selection).await
}

pub async fn skip(
    settings: &Settings,
    projection: &str,
    selection: &Selection,
    reason: &str,
) -> Result<Vec<i64>, ParkedError> {
    let mut client = client(settings).await?;
    parked::skip(&mut client, projection, selection, reason).await
}

/// One line per key retried.
pub fn render_retried(results: &[Retried]) -> String {
    let mut out = String::new();
    for result in results {
        let key = result.key.as_deref().map_or("(no key)".to_string(), |key| format!("key `{key}`"));
        let done: Vec<String> = result.done.iter().map(|(id, outcome)| format!("#{id} {outcome}")).collect();
        out.push_str(&format!(
            "{key}: {}",
            if done.is_empty() { "nothing re-applied".into() } else { done.join(", ") }
        ));
        if result.released > 0 {
            out.push_str(&format!("; {} held event(s) applied after them", result.released));
        }
        if let Some((id, message)) = &result.parked_again {
            out.push_str(&format!("; #{id} parked again: {message}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::shown_bytes;

    #[test]
    fn bytes_are_shown_faithfully() {
        assert_eq!(shown_bytes(None), "(none)");
        assert_eq!(shown_bytes(Some(b"{\"a\": 1}\n")), "{\"a\": 1}\n");
        assert_eq!(shown_bytes(Some(b"a\0b\\")), "(escaped) a\\u{0}b\\\\");
        assert_eq!(shown_bytes(Some(&[0xff, 0x00])), "(not UTF-8) 0xff00");
        let long = "é".repeat(3000);
        let shown = shown_bytes(Some(long.as_bytes()));
        assert!(shown.ends_with("… (6000 bytes in all)") && shown.starts_with("éé"), "{shown}");
    }

    /// A text that reads like a marker was shown as it is: the text `(none)` looked like no value,
    /// and `(not UTF-8) 0x00` like the byte 0 (seen while giving the fuzz target `decode` its
    /// read-back check, which now covers it).
    #[test]
    fn no_text_reads_as_another_value() {
        assert_eq!(shown_bytes(Some(b"(none)")), "(escaped) (none)");
        assert_eq!(shown_bytes(Some(b"(not UTF-8) 0x00")), "(escaped) (not UTF-8) 0x00");
        assert_eq!(shown_bytes(Some(b"(escaped) \\u{0}")), "(escaped) (escaped) \\\\u{0}");
        assert_ne!(shown_bytes(Some(b"(escaped) \\u{0}")), shown_bytes(Some(b"\0")));
        assert_eq!(shown_bytes(Some(b"a (b)")), "a (b)");
    }
}
