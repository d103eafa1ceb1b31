//! The results: rounding and ratios, the JSON file, the summary table, and the read models' checks.

use std::path::Path;

use serde_json::{json, Value};

pub fn round(value: f64, digits: i32) -> f64 {
    let factor = 10f64.powi(digits);
    (value * factor).round() / factor
}

/// `a / b` to 0.01, or `null` where either is not positive.
pub fn ratio(a: f64, b: f64) -> Value {
    if a > 0.0 && b > 0.0 {
        json!(round(a / b, 2))
    } else {
        Value::Null
    }
}

fn get(value: &Value, path: &[&str]) -> f64 {
    path.iter().fold(value, |v, k| &v[*k]).as_f64().unwrap_or(0.0)
}

/// A string of the results as it is (`""` where it is not one).
fn text(value: &Value) -> String {
    value.as_str().unwrap_or("").to_string()
}

/// Adds the engine modes' ratios to `results`, writes them to `path` as JSON, prints the table
/// and where the JSON is.
pub fn write(results: &mut Value, path: &Path) -> anyhow::Result<()> {
    let ceiling = get(results, &["ceiling", "events_per_s"]);
    let naive = get(results, &["naive", "events_per_s"]);
    for mode in ["mock", "tansu"] {
        let rate = get(results, &[mode, "projector", "events_per_s_steady"]);
        results["ratios"][mode] =
            json!({ "projector_over_ceiling": ratio(rate, ceiling), "projector_over_naive": ratio(rate, naive) });
        if rate > 0.0 && get(results, &["args", "projections"]) > 1.0 {
            results["ratios"][mode]["note"] = json!("the projector's rate is the events applied across all its projections per second (records × projections); the ceiling's and the naive rate are one table's");
        }
    }
    std::fs::write(path, serde_json::to_string_pretty(results)?)?;
    print_summary(results);
    println!("results: {}", path.display());
    Ok(())
}

fn print_summary(results: &Value) {
    let mut table = comfy_table::Table::new();
    table.set_header(["mode", "events/s", "vs ceiling", "vs naive", "peak RSS", "latency p50 / p99 / max", "check"]);
    let ceiling = get(results, &["ceiling", "events_per_s"]);
    let naive = get(results, &["naive", "events_per_s"]);
    let cell = |v: f64| if v > 0.0 { format!("{v:.0}") } else { "-".into() };
    let mut row = |cells: [String; 7]| {
        table.add_row(cells.to_vec());
    };
    if !results["decode"].is_null() {
        let decode = &results["decode"];
        let label = format!("decode ({} records; no Kafka, no Postgres)", decode["records"]);
        let rate = cell(get(decode, &["records_per_s"]));
        let time = format!("{} ns per record", decode["ns_per_record"]);
        row([label, rate, "".into(), "".into(), "".into(), time, text(&decode["check"])]);
    }
    if !results["ceiling"].is_null() {
        let check = text(&results["ceiling"]["check"]);
        row(["ceiling (unnest, 2 conns)".into(), cell(ceiling), "1.00".into(), "".into(), "".into(), "".into(), check]);
    }
    if !results["naive"].is_null() {
        let mode = format!("naive (sample of {})", results["naive"]["events"]);
        let vs_ceiling = ratio(naive, ceiling).to_string();
        row([mode, cell(naive), vs_ceiling, "1.00".into(), "".into(), "".into(), "".into()]);
    }
    let projector = projector_label(&results["args"]);
    for (mode, label, rss) in [
        ("mock", "mock cluster (in-process)", "engine_rss_increase_mb"),
        ("tansu", "Tansu (child process)", "engine_peak_rss_mb"),
    ] {
        if results[mode].is_null() || results[mode]["projector"].is_null() {
            continue;
        }
        let rate = get(results, &[mode, "projector", "events_per_s_steady"]);
        let latency = results[mode]["latency"].as_array().cloned().unwrap_or_default();
        row([
            format!("{projector}, {label}"),
            cell(rate),
            ratio(rate, ceiling).to_string(),
            ratio(rate, naive).to_string(),
            format!("{} MB{}", results[mode]["projector"][rss], if mode == "mock" { " (increase)" } else { "" }),
            latency
                .iter()
                .map(|phase| {
                    format!(
                        "{}: {} / {} / {} ms",
                        text(&phase["rate"]),
                        phase["p50_ms"],
                        phase["p99_ms"],
                        phase["max_ms"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            text(&results[mode]["projector"]["check"]),
        ]);
    }
    for (mode, label) in [("mock", "mock"), ("tansu", "Tansu")] {
        let rebuild = &results[mode]["rebuild"];
        if rebuild.is_null() {
            continue;
        }
        let rate = get(rebuild, &["events_per_s"]);
        let of = rebuild["projection"].as_str().map(|name| format!(" of {name}")).unwrap_or_default();
        row([
            format!("rebuild in place{of} ({} events, {label})", rebuild["events"]),
            cell(rate),
            ratio(rate, ceiling).to_string(),
            ratio(rate, naive).to_string(),
            "".into(),
            format!("{}× steady; from its first checkpoint {}×", rebuild["over_steady"], rebuild["steady_over_steady"]),
            text(&rebuild["check"]),
        ]);
    }
    for mode in ["mock", "tansu"] {
        if let Some(reason) = results[mode]["skipped"].as_str() {
            row([mode.to_string(), "-".into(), "".into(), "".into(), "".into(), "".into(), reason.to_string()]);
        }
    }
    println!("{table}");
}

/// The engine modes' label: `projector`, with the projections when not the one versioned default
/// (`projector ×4 projections, event-id, keep_event_ids 2s`).
fn projector_label(args: &Value) -> String {
    let mut label = "projector".to_string();
    if let Some(n) = args["projections"].as_u64().filter(|n| *n > 1) {
        label += &format!(" ×{n} projections");
    }
    if args["dedupe"].as_str() == Some("event-id") {
        label += ", event-id";
    }
    if let Some(keep) = args["keep_event_ids"].as_str() {
        label += &format!(", keep_event_ids {keep}");
    }
    label
}

/// Fails when a read model differs from the workload: every `check` that is not ok, with where it is.
pub fn check(results: &Value) -> anyhow::Result<()> {
    let mut mismatches = Vec::new();
    find_mismatches(results, "", &mut mismatches);
    if !mismatches.is_empty() {
        anyhow::bail!("read models differ from the workload: {}", mismatches.join("; "));
    }
    Ok(())
}

fn find_mismatches(value: &Value, at: &str, found: &mut Vec<String>) {
    if let Value::Object(map) = value {
        for (key, inner) in map {
            let here = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
            match inner.as_str() {
                Some(check) if key == "check" && !check.starts_with("ok") => found.push(format!("{here}: {check}")),
                _ => find_mismatches(inner, &here, found),
            }
        }
    }
}
