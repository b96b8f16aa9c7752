//! What a sweep over every master needs to know of a Redis Cluster's slots: which master owns
//! which, and which slots are moving, as each master says of itself in `CLUSTER NODES`.
//!
//! A `SCAN` of each master misses a key that moves from a master not yet scanned to one already
//! scanned. A key moves only with its slot, so the prefix purge takes this picture before and
//! after its scans and then lists, slot by slot, the keys of every slot that was moving in
//! either picture or changed owner between them ([`slots_to_recheck`]), on the nodes it moved
//! between, the source first. What this cannot see is a slot that moved away and back again
//! entirely between the two pictures.

use std::collections::HashMap;

/// The cluster as its masters describe themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SlotPicture {
    /// The slot ranges, first and last slot, each with the master that lists it as its own.
    owned: Vec<(u16, u16, String)>,
    /// The slots being moved: (slot, from address, to address), sorted, each once; from the
    /// source's `MIGRATING` marker or the target's `IMPORTING` one.
    pub(crate) moving: Vec<(u16, String, String)>,
}

/// A node's address in a `CLUSTER NODES` line (`ip:port@cport[,hostname]`): `ip:port`.
fn address(field: &str) -> &str {
    let field = field.split(',').next().unwrap_or(field);
    field.split('@').next().unwrap_or(field)
}

impl SlotPicture {
    /// The picture from each master's `CLUSTER NODES` output (its `myself` line, and the other
    /// lines to name the nodes its markers point at). A reply without a `myself` line that is a
    /// master is skipped; a marker naming an unknown node is kept with the node's id.
    pub(crate) fn from_nodes_replies<'a>(replies: impl IntoIterator<Item = &'a str>) -> Self {
        let mut picture = SlotPicture::default();
        for reply in replies {
            let lines: Vec<Vec<&str>> = reply
                .lines()
                .map(|line| line.split_whitespace().collect::<Vec<_>>())
                .filter(|fields| fields.len() >= 8)
                .collect();
            let ids: HashMap<&str, &str> = lines
                .iter()
                .map(|fields| (fields[0], address(fields[1])))
                .collect();
            let Some(me) = lines.iter().find(|fields| {
                let flags = fields[2];
                flags.split(',').any(|f| f == "myself") && flags.split(',').any(|f| f == "master")
            }) else {
                continue;
            };
            let my_address = address(me[1]).to_owned();
            for field in &me[8..] {
                let Some(marker) = field.strip_prefix('[').and_then(|f| f.strip_suffix(']')) else {
                    let (first, last) = field.split_once('-').unwrap_or((field, field));
                    if let (Ok(first), Ok(last)) = (first.parse::<u16>(), last.parse::<u16>()) {
                        picture.owned.push((first, last, my_address.clone()));
                    }
                    continue;
                };
                let parsed = if let Some((slot, id)) = marker.split_once("->-") {
                    slot.parse::<u16>().ok().map(|slot| {
                        let to = ids.get(id).copied().unwrap_or(id).to_owned();
                        (slot, my_address.clone(), to)
                    })
                } else if let Some((slot, id)) = marker.split_once("-<-") {
                    slot.parse::<u16>().ok().map(|slot| {
                        let from = ids.get(id).copied().unwrap_or(id).to_owned();
                        (slot, from, my_address.clone())
                    })
                } else {
                    None
                };
                if let Some(moving) = parsed {
                    picture.moving.push(moving);
                }
            }
        }
        picture.owned.sort();
        picture.moving.sort();
        picture.moving.dedup();
        picture
    }

    /// The master that lists `slot` as its own (the first, should two claim it).
    fn owner(&self, slot: u16) -> Option<&str> {
        self.owned
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, owner)| owner.as_str())
    }
}

/// The slots whose keys may have moved between two pictures, each with the nodes to list its
/// keys on, in order: every slot moving in either picture (its source, then its target) and
/// every slot whose owner changed (the old owner, then the new). Sorted by slot.
pub(crate) fn slots_to_recheck(
    before: &SlotPicture,
    after: &SlotPicture,
) -> Vec<(u16, Vec<String>)> {
    let mut out: Vec<(u16, Vec<String>)> = Vec::new();
    let mut add = |slot: u16, nodes: [&str; 2]| {
        let i = match out.binary_search_by_key(&slot, |(s, _)| *s) {
            Ok(i) => i,
            Err(i) => {
                out.insert(i, (slot, Vec::new()));
                i
            }
        };
        for node in nodes {
            if !out[i].1.iter().any(|n| n == node) {
                out[i].1.push(node.to_owned());
            }
        }
    };
    for (slot, from, to) in before.moving.iter().chain(&after.moving) {
        add(*slot, [from, to]);
    }
    if before.owned != after.owned {
        for slot in 0..=MAX_SLOT {
            match (before.owner(slot), after.owner(slot)) {
                (Some(old), Some(new)) if old != new => add(slot, [old, new]),
                (Some(only), None) | (None, Some(only)) => add(slot, [only, only]),
                _ => {}
            }
        }
    }
    out
}

/// The last hash slot.
const MAX_SLOT: u16 = 16383;

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaa";
    const B: &str = "bbbb";

    fn line(id: &str, port: u16, flags: &str, epoch: u64, slots: &str) -> String {
        format!(
            "{id} 127.0.0.1:{port}@{} {flags} - 0 0 {epoch} connected {slots}\n",
            port + 10000
        )
    }

    #[test]
    fn a_quiet_cluster_has_owners_and_nothing_moving() {
        let a =
            line(A, 7000, "myself,master", 1, "0-8191") + &line(B, 7001, "master", 2, "8192-16383");
        let b =
            line(A, 7000, "master", 1, "0-8191") + &line(B, 7001, "myself,master", 2, "8192-16383");
        let picture = SlotPicture::from_nodes_replies([a.as_str(), b.as_str()]);
        assert!(picture.moving.is_empty());
        assert_eq!(
            picture.owned,
            vec![
                (0, 8191, "127.0.0.1:7000".to_owned()),
                (8192, 16383, "127.0.0.1:7001".to_owned()),
            ]
        );
    }

    #[test]
    fn markers_on_either_side_name_one_move() {
        let a = line(A, 7000, "myself,master", 1, &format!("0-8191 [93->-{B}]"))
            + &line(B, 7001, "master", 2, "8192-16383");
        let b = line(A, 7000, "master", 1, "0-8191")
            + &line(
                B,
                7001,
                "myself,master",
                2,
                &format!("8192-16383 [93-<-{A}]"),
            );
        let picture = SlotPicture::from_nodes_replies([a.as_str(), b.as_str()]);
        assert_eq!(
            picture.moving,
            vec![(93, "127.0.0.1:7000".to_owned(), "127.0.0.1:7001".to_owned())]
        );
        // A marker does not change the owners' ranges: the pictures with and without one differ
        // only in `moving`.
        let quiet = line(A, 7000, "myself,master", 1, "0-8191");
        let quiet = SlotPicture::from_nodes_replies([quiet.as_str(), b.as_str()]);
        assert_eq!(quiet.owned, picture.owned);
    }

    #[test]
    fn moving_and_rehomed_slots_are_rechecked_on_both_nodes_source_first() {
        let x = "127.0.0.1:7000".to_owned();
        let y = "127.0.0.1:7001".to_owned();
        let quiet_a = line(A, 7000, "myself,master", 1, "0-8191");
        let quiet_b = line(B, 7001, "myself,master", 2, "8192-16383");
        let quiet = SlotPicture::from_nodes_replies([quiet_a.as_str(), quiet_b.as_str()]);
        assert!(slots_to_recheck(&quiet, &quiet).is_empty());

        // Slot 93 moving from A to B in the second picture.
        let moving_a = line(A, 7000, "myself,master", 1, &format!("0-8191 [93->-{B}]"));
        let moving_a = moving_a + &line(B, 7001, "master", 2, "");
        let moving = SlotPicture::from_nodes_replies([moving_a.as_str(), quiet_b.as_str()]);
        assert_eq!(
            slots_to_recheck(&quiet, &moving),
            vec![(93, vec![x.clone(), y.clone()])]
        );
        assert_eq!(
            slots_to_recheck(&moving, &moving),
            vec![(93, vec![x.clone(), y.clone()])]
        );

        // Slots 93 and 94 moved to B entirely between the pictures.
        let moved_a = line(A, 7000, "myself,master", 1, "0-92 95-8191");
        let moved_b = line(B, 7001, "myself,master", 3, "93-94 8192-16383");
        let moved = SlotPicture::from_nodes_replies([moved_a.as_str(), moved_b.as_str()]);
        assert_eq!(
            slots_to_recheck(&quiet, &moved),
            vec![
                (93, vec![x.clone(), y.clone()]),
                (94, vec![x.clone(), y.clone()])
            ]
        );
        // Moving back: the old owner (B) first.
        assert_eq!(
            slots_to_recheck(&moved, &quiet),
            vec![
                (93, vec![y.clone(), x.clone()]),
                (94, vec![y.clone(), x.clone()])
            ]
        );
        // A slot no master claims in one picture (its owner died) is listed on the one that
        // does.
        let lost = SlotPicture::from_nodes_replies([quiet_a.as_str()]);
        let rechecked = slots_to_recheck(&quiet, &lost);
        assert_eq!(rechecked.len(), 8192);
        assert_eq!(rechecked[0], (8192, vec![y.clone()]));
    }

    #[test]
    fn replicas_short_lines_and_garbage_are_skipped() {
        let replica = line(A, 7003, "myself,slave", 3, "");
        let short = "abc 127.0.0.1:7000 myself,master\n";
        let garbage = "\u{0}\n\n[[[\n";
        let picture = SlotPicture::from_nodes_replies([replica.as_str(), short, garbage]);
        assert_eq!(picture, SlotPicture::default());
        // A marker naming a node the reply does not list keeps the id; a broken marker is
        // dropped.
        let odd = line(A, 7000, "myself,master", 1, "0-10 [5->-zzzz] [x->-y] [7]");
        let picture = SlotPicture::from_nodes_replies([odd.as_str()]);
        assert_eq!(
            picture.moving,
            vec![(5, "127.0.0.1:7000".to_owned(), "zzzz".to_owned())]
        );
    }
}
