//! The orders a fixture's events are delivered in besides as written: keys interleaved
//! differently (each key's order kept), and one key's events out of order.

use rand::seq::SliceRandom;
use rand::Rng;

use super::fixture::{record_of, Fixture};
use crate::projection::{Decoded, Projection};

/// The fixture's events grouped by the key the engine orders them by (events with none each on
/// their own), each group in the order written; and a label per event (its type and id, as the
/// projection reads them) for reports.
pub(super) fn keys_of(projection: &Projection, fixture: &Fixture) -> (Vec<(String, Vec<usize>)>, Vec<String>) {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut labels = Vec::with_capacity(fixture.events.len());
    for (i, event) in fixture.events.iter().enumerate() {
        let record = record_of(event, "fixture", 0);
        let decoded = projection.decode(&record);
        let key = match &decoded {
            Decoded::Handled { .. } | Decoded::Poison { .. } => projection.parking_key(&record, &decoded),
            _ => None,
        }
        .unwrap_or_else(|| format!("(event {})", i + 1));
        labels.push(match &decoded {
            Decoded::Handled { event, .. } => match &event.event_id {
                Some(id) => format!("({} {id})", event.event_type),
                None => format!("({})", event.event_type),
            },
            Decoded::Ignored { event_type } => format!("({event_type}, ignored)"),
            Decoded::Tombstone => "(tombstone)".into(),
            Decoded::Poison { .. } => "(not decodable)".into(),
        });
        match groups.iter_mut().find(|(known, _)| *known == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    (groups, labels)
}

/// A random interleaving of the groups, each group's order kept.
pub(super) fn interleaved(groups: &[(String, Vec<usize>)], rng: &mut impl Rng) -> Vec<usize> {
    let mut slots: Vec<usize> =
        groups.iter().enumerate().flat_map(|(g, (_, members))| std::iter::repeat_n(g, members.len())).collect();
    slots.shuffle(rng);
    let mut next = vec![0; groups.len()];
    slots
        .into_iter()
        .map(|g| {
            next[g] += 1;
            groups[g].1[next[g] - 1]
        })
        .collect()
}

/// The written order, but with the events of one random key (of two or more) shuffled among
/// their own positions.
pub(super) fn out_of_order(groups: &[(String, Vec<usize>)], rng: &mut impl Rng) -> Option<(String, Vec<usize>)> {
    let candidates: Vec<&(String, Vec<usize>)> = groups.iter().filter(|(_, members)| members.len() > 1).collect();
    let (key, members) = candidates.get(rng.random_range(0..candidates.len().max(1)))?;
    let mut shuffled = members.clone();
    while shuffled == *members {
        shuffled.shuffle(rng);
    }
    let mut order: Vec<usize> = (0..groups.iter().map(|(_, m)| m.len()).sum()).collect();
    for (position, event) in members.iter().zip(&shuffled) {
        order[*position] = *event;
    }
    Some((key.clone(), order))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn interleavings_keep_each_keys_order_and_out_of_order_breaks_one() {
        let groups = vec![("a".to_string(), vec![0, 2, 4]), ("b".to_string(), vec![1, 3]), ("c".to_string(), vec![5])];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let order = interleaved(&groups, &mut rng);
            assert_eq!(order.len(), 6);
            for (_, members) in &groups {
                let positions: Vec<usize> =
                    members.iter().map(|m| order.iter().position(|o| o == m).unwrap()).collect();
                assert!(positions.windows(2).all(|w| w[0] < w[1]), "{order:?}");
            }
            let (key, order) = out_of_order(&groups, &mut rng).expect("a key with two events");
            let members = &groups.iter().find(|(k, _)| *k == key).unwrap().1;
            let positions: Vec<usize> = members.iter().map(|m| order.iter().position(|o| o == m).unwrap()).collect();
            assert!(positions.windows(2).any(|w| w[0] > w[1]), "{key}: {order:?}");
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4, 5]);
        }
    }
}
