//! What `projector test` found, and how it is shown: as text for a terminal, as JSON (serde),
//! or as JUnit XML for CI.

use std::collections::BTreeMap;

use serde::Serialize;

/// One run of a fixture: its name, the events in the order delivered (indices into the
/// fixture, from 1), and what differed from the expected rows (empty: passed).
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run: String,
    pub order: Vec<usize>,
    pub differences: Vec<String>,
}

/// A fixture's runs.
#[derive(Debug, Clone, Serialize)]
pub struct FixtureResult {
    pub projection: String,
    pub fixture: String,
    pub description: Option<String>,
    pub runs: Vec<RunResult>,
    /// Each event's label for the text report (type and id, as the projection reads them).
    #[serde(skip)]
    pub labels: Vec<String>,
}

impl FixtureResult {
    pub fn passed(&self) -> bool {
        self.runs.iter().all(|run| run.differences.is_empty())
    }
}

/// Everything `projector test` found.
#[derive(Debug, Clone, Serialize)]
pub struct TestReport {
    pub seed: u64,
    pub fixtures: Vec<FixtureResult>,
}

impl TestReport {
    pub fn passed(&self) -> bool {
        self.fixtures.iter().all(FixtureResult::passed)
    }
}

/// The report as text, for a terminal.
pub fn text(report: &TestReport) -> String {
    let mut out = String::new();
    for result in &report.fixtures {
        let runs = result.runs.len();
        if result.passed() {
            out.push_str(&format!("ok    {} {} ({runs} runs)\n", result.projection, result.fixture));
            continue;
        }
        out.push_str(&format!("FAIL  {} {}\n", result.projection, result.fixture));
        for run in result.runs.iter().filter(|run| !run.differences.is_empty()) {
            let order: Vec<String> = run
                .order
                .iter()
                .map(|i| match result.labels.get(i - 1) {
                    Some(label) => format!("{i} {label}"),
                    None => i.to_string(),
                })
                .collect();
            out.push_str(&format!("      {}: events delivered as {}\n", run.run, order.join(", ")));
            for difference in &run.differences {
                out.push_str(&format!("        {difference}\n"));
            }
        }
    }
    let failed = report.fixtures.iter().filter(|fixture| !fixture.passed()).count();
    out.push_str(&format!(
        "{} fixture(s), {failed} failed; seed {} (`--seed {}` replays these orders)\n",
        report.fixtures.len(),
        report.seed,
        report.seed
    ));
    out
}

/// The report as JUnit XML: a test suite per projection, a test case per fixture and run.
pub fn junit(report: &TestReport) -> String {
    use quick_xml::escape::escape;
    let mut suites: BTreeMap<&str, Vec<&FixtureResult>> = BTreeMap::new();
    for fixture in &report.fixtures {
        suites.entry(&fixture.projection).or_default().push(fixture);
    }
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"projector test\">\n");
    for (projection, fixtures) in suites {
        let cases: Vec<(&FixtureResult, &RunResult)> =
            fixtures.iter().flat_map(|fixture| fixture.runs.iter().map(move |run| (*fixture, run))).collect();
        let failures = cases.iter().filter(|(_, run)| !run.differences.is_empty()).count();
        out.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\">\n",
            escape(projection),
            cases.len()
        ));
        for (fixture, run) in cases {
            out.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\"",
                escape(fixture.fixture.as_str()),
                escape(run.run.as_str())
            ));
            if run.differences.is_empty() {
                out.push_str("/>\n");
            } else {
                let order: Vec<String> = run.order.iter().map(ToString::to_string).collect();
                out.push_str(&format!(
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    escape(run.differences[0].as_str()),
                    escape(
                        format!("events delivered as {}\n{}", order.join(", "), run.differences.join("\n")).as_str()
                    )
                ));
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}
