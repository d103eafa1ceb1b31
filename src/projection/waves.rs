//! Which events of an event-id projection's batch may share set-based statements: each event
//! goes to the first *wave* after every earlier event whose rows its statements may also touch,
//! so that running the waves in order, each one's statements in any order, gives what running
//! the events one by one in batch order gives. Pure: the fast path (`store::fast`) describes each
//! event's statements by what they touch ([`Touch`]) and runs the waves.
//!
//! Two statements' rows may meet when they are on the same table (by its last name part, see
//! [`super::set_based::Footprint`]) and
//! - both are keyed by the same columns with the same values (a NULL value meets nothing: it
//!   matches no row, and inserts a row of its own);
//! - both are keyed, by different columns (no telling);
//! - one is an unkeyed insert, the other anything but an unkeyed insert of the same statement.
//!   Inserts of one statement only add rows, and keep their order within one statement (its
//!   rows are inserted in array order): such events may share a wave, though never an earlier
//!   one than the last of them.

use std::collections::HashMap;

/// What one statement of an event touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touch<'p> {
    /// The rows of `table` whose `columns` hold `key` (the values, encoded; `None` when one is
    /// NULL).
    Keyed { table: &'p str, columns: &'p [String], key: Option<Vec<u8>> },
    /// New rows of `table` that no value names, inserted by statement number `statement`.
    Unkeyed { table: &'p str, statement: usize },
}

impl<'p> Touch<'p> {
    fn table(&self) -> &'p str {
        match self {
            Touch::Keyed { table, .. } | Touch::Unkeyed { table, .. } => table,
        }
    }
}

/// The last wave each thing was touched in, per table.
#[derive(Default)]
struct Touched<'p> {
    keys: HashMap<(&'p [String], Vec<u8>), usize>,
    /// By the columns keyed on.
    columns: Vec<(&'p [String], usize)>,
    /// By unkeyed statement.
    unkeyed: Vec<(usize, usize)>,
}

impl<'p> Touched<'p> {
    /// The first wave `touch` may run in.
    fn earliest(&self, touch: &Touch<'p>) -> usize {
        let after = |wave: usize| wave + 1;
        match touch {
            Touch::Keyed { columns, key, .. } => {
                let same_key = key.as_ref().and_then(|key| self.keys.get(&(*columns, key.clone()))).map(|w| after(*w));
                let other_columns = self.columns.iter().filter(|(c, _)| c != columns).map(|(_, w)| after(*w));
                let unkeyed = self.unkeyed.iter().map(|(_, w)| after(*w));
                same_key.into_iter().chain(other_columns).chain(unkeyed).max().unwrap_or(0)
            }
            Touch::Unkeyed { statement, .. } => {
                let keyed = self.columns.iter().map(|(_, w)| after(*w));
                let unkeyed = self.unkeyed.iter().map(|(s, w)| if s == statement { *w } else { after(*w) });
                keyed.chain(unkeyed).max().unwrap_or(0)
            }
        }
    }

    fn record(&mut self, touch: Touch<'p>, wave: usize) {
        let latest = |at: &mut usize| *at = (*at).max(wave);
        match touch {
            Touch::Keyed { columns, key, .. } => {
                if let Some(key) = key {
                    latest(self.keys.entry((columns, key)).or_insert(wave));
                }
                match self.columns.iter_mut().find(|(c, _)| *c == columns) {
                    Some((_, at)) => latest(at),
                    None => self.columns.push((columns, wave)),
                }
            }
            Touch::Unkeyed { statement, .. } => match self.unkeyed.iter_mut().find(|(s, _)| *s == statement) {
                Some((_, at)) => latest(at),
                None => self.unkeyed.push((statement, wave)),
            },
        }
    }
}

/// Places events, in batch order, into waves.
#[derive(Default)]
pub struct Waves<'p> {
    tables: HashMap<&'p str, Touched<'p>>,
}

impl<'p> Waves<'p> {
    /// The wave of the next event, whose statements touch `touches`: the first after every earlier
    /// event it may meet. An event's own statements may touch the same rows: they run in their
    /// order within the wave.
    pub fn place(&mut self, touches: Vec<Touch<'p>>) -> usize {
        let wave = touches
            .iter()
            .map(|touch| self.tables.get(touch.table()).map_or(0, |touched| touched.earliest(touch)))
            .max()
            .unwrap_or(0);
        for touch in touches {
            self.tables.entry(touch.table()).or_default().record(touch, wave);
        }
        wave
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed<'p>(table: &'p str, columns: &'p [String], key: &str) -> Touch<'p> {
        Touch::Keyed { table, columns, key: Some(key.as_bytes().to_vec()) }
    }

    #[test]
    fn an_event_follows_the_last_one_of_its_key() {
        let id = ["id".to_string()];
        let mut waves = Waves::default();
        let placed: Vec<usize> =
            ["a", "b", "a", "c", "a", "b"].into_iter().map(|key| waves.place(vec![keyed("t", &id, key)])).collect();
        assert_eq!(placed, [0, 0, 1, 0, 2, 1]);
    }

    #[test]
    fn tables_apart_never_meet_and_a_null_key_meets_nothing() {
        let id = ["id".to_string()];
        let mut waves = Waves::default();
        assert_eq!(waves.place(vec![keyed("t", &id, "a")]), 0);
        assert_eq!(waves.place(vec![keyed("u", &id, "a")]), 0);
        assert_eq!(waves.place(vec![Touch::Keyed { table: "t", columns: &id, key: None }]), 0);
        assert_eq!(waves.place(vec![Touch::Keyed { table: "t", columns: &id, key: None }]), 0);
        assert_eq!(waves.place(vec![keyed("t", &id, "a")]), 1);
    }

    #[test]
    fn keys_on_other_columns_of_a_table_are_taken_to_meet() {
        let (id, email) = (["id".to_string()], ["email".to_string()]);
        let mut waves = Waves::default();
        assert_eq!(waves.place(vec![keyed("t", &id, "a")]), 0);
        assert_eq!(waves.place(vec![keyed("t", &email, "x")]), 1);
        assert_eq!(waves.place(vec![keyed("t", &id, "b")]), 2);
    }

    #[test]
    fn inserts_of_one_statement_keep_their_order_and_anything_else_follows_them() {
        let id = ["id".to_string()];
        let mut waves = Waves::default();
        assert_eq!(waves.place(vec![keyed("log", &id, "a")]), 0);
        assert_eq!(waves.place(vec![Touch::Unkeyed { table: "log", statement: 7 }]), 1);
        assert_eq!(waves.place(vec![Touch::Unkeyed { table: "log", statement: 7 }]), 1);
        assert_eq!(waves.place(vec![Touch::Unkeyed { table: "log", statement: 8 }]), 2);
        assert_eq!(waves.place(vec![Touch::Unkeyed { table: "log", statement: 7 }]), 3);
        assert_eq!(waves.place(vec![keyed("log", &id, "b")]), 4);
        assert_eq!(waves.place(vec![keyed("other", &id, "b")]), 0);
    }

    #[test]
    fn an_event_goes_after_the_latest_of_everything_it_touches() {
        let id = ["id".to_string()];
        let mut waves = Waves::default();
        assert_eq!(waves.place(vec![keyed("t", &id, "a")]), 0);
        assert_eq!(waves.place(vec![keyed("t", &id, "a")]), 1);
        assert_eq!(waves.place(vec![keyed("u", &id, "z")]), 0);
        // Touches `t`/a (last in wave 1) and `u`/z (wave 0): wave 2, for both of its statements.
        assert_eq!(waves.place(vec![keyed("u", &id, "z"), keyed("t", &id, "a")]), 2);
        // `u`/z was last touched in wave 2 now.
        assert_eq!(waves.place(vec![keyed("u", &id, "z")]), 3);
        // Its own statements on one row do not push an event further.
        assert_eq!(waves.place(vec![keyed("v", &id, "q"), keyed("v", &id, "q")]), 0);
    }
}
