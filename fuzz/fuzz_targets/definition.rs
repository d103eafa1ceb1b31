//! The definition loader on any text: it returns a projection or errors with file and line, and
//! never panics.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match projector::projection::compile_file(Path::new("fuzz.toml"), text) {
        Ok(projection) => {
            // A compiled projection is usable: its tables and hash are computed without panicking.
            let _ = projection.tables();
            assert_eq!(projection.hash.len(), 64);
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for error in errors {
                let _ = error.to_string();
            }
        }
    }
});
