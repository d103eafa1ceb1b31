//! Polling: waiting for a condition with a deadline, failing with what was last seen.

use std::future::Future;
use std::time::Duration;

/// What a [`wait_for`] check says: ready (with a value), or not yet (and why).
pub trait Check {
    type Value;
    fn ready(self) -> Result<Self::Value, String>;
}

/// `true`: ready.
impl Check for bool {
    type Value = ();
    fn ready(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    }
}

/// `Ok(value)`: ready with `value`; `Err(why_not)`: not yet.
impl<T> Check for Result<T, String> {
    type Value = T;
    fn ready(self) -> Result<T, String> {
        self
    }
}

/// Calls `check` every 100 ms until it is ready (`true`, or `Ok(value)`: the value is returned);
/// panics naming `what` and the last reason `check` gave (its `Err`) after `timeout`.
pub async fn wait_for<C, F, Fut>(what: &str, timeout: Duration, mut check: F) -> C::Value
where
    C: Check,
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let why_not = match check().await.ready() {
            Ok(value) => return value,
            Err(why_not) => why_not,
        };
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {why_not}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
