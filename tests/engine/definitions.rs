//! Definition files under `tests/fixtures/definitions`: every `ok/` file compiles, every `fail/`
//! file fails with the error its `# expect:` and `# expect-line:` header lines name.

use std::path::{Path, PathBuf};

use projector::projection::{compile_file, load_dir};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/definitions").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

/// The `# expect: …` and `# expect-line: N` header of a failing fixture.
fn expectation(path: &Path, text: &str) -> (String, usize) {
    let mut lines = text.lines();
    let message = lines.next().and_then(|l| l.strip_prefix("# expect: "));
    let line = lines.next().and_then(|l| l.strip_prefix("# expect-line: ")).and_then(|n| n.trim().parse().ok());
    match (message, line) {
        (Some(message), Some(line)) => (message.trim().to_string(), line),
        _ => panic!("{}: starts without `# expect:` and `# expect-line:` lines", path.display()),
    }
}

#[test]
fn ok_definitions_compile() {
    for path in fixtures("ok") {
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(errors) = compile_file(&path, &text) {
            let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("{} should compile:\n{}", path.display(), shown.join("\n"));
        }
    }
}

#[test]
fn fail_definitions_fail_with_the_expected_error_and_line() {
    let mut mismatches = Vec::new();
    for path in fixtures("fail") {
        let text = std::fs::read_to_string(&path).unwrap();
        let (expected, line) = expectation(&path, &text);
        match compile_file(&path, &text) {
            Ok(_) => mismatches.push(format!("{}: compiled, expected `{expected}`", path.display())),
            Err(errors) => {
                if !errors.iter().any(|e| e.message.contains(&expected) && e.line == line) {
                    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    mismatches.push(format!(
                        "{}: expected `{expected}` at line {line}, got:\n  {}",
                        path.display(),
                        shown.join("\n  ")
                    ));
                }
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn load_dir_reports_every_failing_file_at_once() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/definitions/fail");
    let errors = load_dir(&dir).unwrap_err();
    for path in fixtures("fail") {
        assert!(errors.iter().any(|e| e.file == path), "no error for {}", path.display());
    }
}

#[test]
fn load_dir_compiles_the_ok_fixtures_in_file_name_order() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/definitions/ok");
    let projections = load_dir(&dir).unwrap();
    let files: Vec<PathBuf> = projections.iter().map(|p| p.file.clone()).collect();
    assert_eq!(files, fixtures("ok"));
}

#[test]
fn load_dir_rejects_duplicate_names_and_unreadable_folders() {
    let dir = tempfile::tempdir().unwrap();
    let text = "name = \"same\"\ntopics = [\"t\"]\ndedupe = \"event_id\"\n[on.A]\nsql = \"SELECT 1\"\n";
    std::fs::write(dir.path().join("a.toml"), text).unwrap();
    std::fs::write(dir.path().join("b.toml"), text).unwrap();
    std::fs::write(dir.path().join("notes.md"), "not a definition").unwrap();
    let errors = load_dir(dir.path()).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].message.contains("projection `same` is already defined in"), "{errors:?}");
    assert!(errors[0].file.ends_with("b.toml"));

    assert!(load_dir(&dir.path().join("missing")).is_err());
    let empty = tempfile::tempdir().unwrap();
    assert!(load_dir(empty.path()).unwrap().is_empty());
}

#[test]
fn example_projections_compile() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("projections");
    let has_definitions = std::fs::read_dir(&dir)
        .map(|entries| entries.flatten().any(|e| e.path().extension().is_some_and(|ext| ext == "toml")))
        .unwrap_or(false);
    if !has_definitions {
        eprintln!("no example projections yet in {}", dir.display());
        return;
    }
    if let Err(errors) = load_dir(&dir) {
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!("example projections should compile:\n{}", shown.join("\n"));
    }
}
