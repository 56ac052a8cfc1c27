//! Which edge links a batch goes to. One `Route` per broker shard; sans-io.
//!
//! Each edge node has up to two links to this shard (Low and High) and one interest set
//! (rooms and areas, each with the encodings its viewers asked for), learnt from SUB/UNSUB on
//! either link (the link doc puts them on the Low link).
//!
//! Invariants:
//! - `rooms[r]` holds edge `e` iff `edges[e].rooms` holds `r` (same for areas); both change together.
//! - Losing or replacing an edge's Low link clears its interest and its counts: the edge
//!   re-sends every SUB when it reconnects, so stale interest never outlives its link.
//! - Room batches reach only edges with viewers of the room, area batches only edges with
//!   interest in the area; global, user and device batches go to every edge with a link
//!   (this version has no per-user index on the broker).
//! - High batches go on an edge's High link, or its Low link while the High link is down.

use proto::id::{AreaId, Encoding, Priority, RoomId, Scope};
use proto::link::Interest;
use slab::Slab;
use std::collections::HashMap;

/// A link of this shard (unique for the shard's life, never reused).
pub type LinkId = u64;

/// One destination of a batch: a link and the encodings (a set of [`Encoding::bit`]) to send on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub link: LinkId,
    pub encodings: u8,
}

const ENCODINGS: [Encoding; 3] = [Encoding::Plain, Encoding::Zlib, Encoding::Brotli];

#[derive(Default)]
struct Edge {
    node_id: String,
    low: Option<LinkId>,
    high: Option<LinkId>,
    rooms: HashMap<RoomId, u8>,
    areas: HashMap<AreaId, u8>,
    /// How many rooms/areas want each encoding (indexed like `ENCODINGS`).
    encoding_refs: [u32; 3],
    /// This node's last reported viewer count per room.
    counts: HashMap<RoomId, u32>,
}

impl Edge {
    fn link(&self, priority: Priority) -> Option<LinkId> {
        match priority {
            Priority::High => self.high.or(self.low),
            Priority::Low => self.low,
        }
    }

    fn add_refs(&mut self, encodings: u8, delta: i64) {
        for (i, e) in ENCODINGS.iter().enumerate() {
            if encodings & e.bit() != 0 {
                self.encoding_refs[i] = (self.encoding_refs[i] as i64 + delta).max(0) as u32;
            }
        }
    }

    /// Every encoding some viewer of this node asked for (Brotli when it reported none).
    fn all_encodings(&self) -> u8 {
        let set = ENCODINGS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.encoding_refs[*i] > 0)
            .fold(0, |acc, (_, e)| acc | e.bit());
        if set == 0 {
            Encoding::Brotli.bit()
        } else {
            set
        }
    }
}

/// What replacing a link did.
#[derive(Debug, PartialEq, Eq)]
pub struct LinkUp {
    /// The link the new one replaces (same node and priority): cut it.
    pub replaced: Option<LinkId>,
}

/// Routing state of one broker shard.
#[derive(Default)]
pub struct Route {
    edges: Slab<Edge>,
    by_node: HashMap<String, usize>,
    /// link -> (edge index, priority)
    links: HashMap<LinkId, (usize, Priority)>,
    rooms: HashMap<RoomId, Vec<(usize, u8)>>,
    areas: HashMap<AreaId, Vec<(usize, u8)>>,
    /// Fleet-wide viewers per room (sum over edges of their last report).
    totals: HashMap<RoomId, u64>,
}

impl Route {
    pub fn new() -> Route {
        Route::default()
    }

    /// A link from `node_id` carrying `priority` is up.
    pub fn link_up(&mut self, node_id: &str, priority: Priority, link: LinkId) -> LinkUp {
        let e = match self.by_node.get(node_id) {
            Some(&e) => e,
            None => {
                let e = self.edges.insert(Edge {
                    node_id: node_id.to_string(),
                    ..Edge::default()
                });
                self.by_node.insert(node_id.to_string(), e);
                e
            }
        };
        self.links.insert(link, (e, priority));
        let slot = match priority {
            Priority::Low => &mut self.edges[e].low,
            Priority::High => &mut self.edges[e].high,
        };
        let replaced = slot.replace(link);
        if let Some(old) = replaced {
            self.links.remove(&old);
            if priority == Priority::Low {
                self.clear_interest(e);
            }
        }
        LinkUp { replaced }
    }

    /// The rooms and areas the edge of `link` watches (with everything global), empty for an
    /// unknown link or a high-priority one.
    pub fn watched_through(&self, link: LinkId) -> Vec<Scope> {
        match self.links.get(&link) {
            Some(&(e, Priority::Low)) => {
                let edge = &self.edges[e];
                let rooms = edge.rooms.keys().map(|r| Scope::Room(*r));
                let areas = edge.areas.keys().map(|a| Scope::Area(*a));
                rooms.chain(areas).chain([Scope::Global]).collect()
            }
            _ => Vec::new(),
        }
    }

    /// A link is gone (closed, dead or cut). Unknown links are ignored.
    pub fn link_down(&mut self, link: LinkId) {
        let Some((e, priority)) = self.links.remove(&link) else {
            return;
        };
        match priority {
            Priority::Low => {
                self.edges[e].low = None;
                self.clear_interest(e);
            }
            Priority::High => self.edges[e].high = None,
        }
        if self.edges[e].low.is_none() && self.edges[e].high.is_none() {
            self.clear_interest(e);
            let edge = self.edges.remove(e);
            self.by_node.remove(&edge.node_id);
        }
    }

    fn clear_interest(&mut self, e: usize) {
        let edge = &mut self.edges[e];
        for (room, _) in edge.rooms.drain() {
            remove_member(&mut self.rooms, room, e);
        }
        for (area, _) in edge.areas.drain() {
            remove_member(&mut self.areas, area, e);
        }
        edge.encoding_refs = [0; 3];
        for (room, n) in edge.counts.drain() {
            sub_total(&mut self.totals, room, n);
        }
    }

    /// SUB from `link`: its node has viewers of `interest` wanting `encodings`.
    /// An empty encoding set means no viewers, like UNSUB.
    pub fn sub(&mut self, link: LinkId, interest: &Interest, encodings: u8) {
        let encodings =
            encodings & (Encoding::Plain.bit() | Encoding::Zlib.bit() | Encoding::Brotli.bit());
        if encodings == 0 {
            return self.unsub(link, interest);
        }
        let Some(&(e, _)) = self.links.get(&link) else {
            return;
        };
        let edge = &mut self.edges[e];
        let old = match interest {
            Interest::Room(r) => edge.rooms.insert(*r, encodings),
            Interest::Area(a) => edge.areas.insert(*a, encodings),
        };
        if let Some(old) = old {
            edge.add_refs(old, -1);
        }
        edge.add_refs(encodings, 1);
        match interest {
            Interest::Room(r) => set_member(&mut self.rooms, *r, e, encodings),
            Interest::Area(a) => set_member(&mut self.areas, *a, e, encodings),
        }
    }

    /// UNSUB from `link`: no more viewers of `interest` on its node.
    pub fn unsub(&mut self, link: LinkId, interest: &Interest) {
        let Some(&(e, _)) = self.links.get(&link) else {
            return;
        };
        let edge = &mut self.edges[e];
        match interest {
            Interest::Room(r) => {
                if let Some(old) = edge.rooms.remove(r) {
                    edge.add_refs(old, -1);
                    remove_member(&mut self.rooms, *r, e);
                }
                if let Some(n) = edge.counts.remove(r) {
                    sub_total(&mut self.totals, *r, n);
                }
            }
            Interest::Area(a) => {
                if let Some(old) = edge.areas.remove(a) {
                    edge.add_refs(old, -1);
                    remove_member(&mut self.areas, *a, e);
                }
            }
        }
    }

    /// COUNTS from `link`: its node's viewers per room (a count of 0 forgets the room).
    pub fn counts(&mut self, link: LinkId, counts: &[(RoomId, u32)]) {
        let Some(&(e, _)) = self.links.get(&link) else {
            return;
        };
        let edge = &mut self.edges[e];
        for &(room, n) in counts {
            let old = if n == 0 {
                edge.counts.remove(&room)
            } else {
                edge.counts.insert(room, n)
            };
            if let Some(old) = old {
                sub_total(&mut self.totals, room, old);
            }
            if n > 0 {
                *self.totals.entry(room).or_insert(0) += n as u64;
            }
        }
    }

    /// Every room with a fleet-wide count, and the count.
    pub fn totals(&self) -> impl Iterator<Item = (RoomId, u64)> + '_ {
        self.totals.iter().map(|(r, n)| (*r, *n))
    }

    /// Fleet-wide viewers of a room as the edges reported them.
    pub fn total(&self, room: RoomId) -> Option<u64> {
        self.totals.get(&room).copied()
    }

    /// The `n` rooms with the most viewers, most first (ties: lower room id first).
    pub fn top(&self, n: usize) -> Vec<(RoomId, u64)> {
        let mut all: Vec<(RoomId, u64)> = self
            .totals
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(r, v)| (*r, *v))
            .collect();
        let by_viewers =
            |a: &(RoomId, u64), b: &(RoomId, u64)| b.1.cmp(&a.1).then(a.0 .0.cmp(&b.0 .0));
        if all.len() > n && n > 0 {
            all.select_nth_unstable_by(n - 1, by_viewers);
        }
        all.truncate(n);
        all.sort_unstable_by(by_viewers);
        all
    }

    /// For each edge with a Low link: (that link, fleet-wide counts of the rooms it watches).
    pub fn fleet_counts(&self, out: &mut Vec<(LinkId, Vec<(RoomId, u32)>)>) {
        for (_, edge) in self.edges.iter() {
            let Some(link) = edge.low else { continue };
            let counts: Vec<(RoomId, u32)> = edge
                .rooms
                .keys()
                .filter_map(|r| {
                    self.totals
                        .get(r)
                        .map(|&n| (*r, n.min(u32::MAX as u64) as u32))
                })
                .collect();
            if !counts.is_empty() {
                out.push((link, counts));
            }
        }
    }

    /// Appends the links (and encodings per link) a batch of `scope` at `priority` goes to.
    pub fn targets(&self, scope: &Scope, priority: Priority, out: &mut Vec<Target>) {
        let members = match scope {
            Scope::Room(r) => self.rooms.get(r),
            Scope::Area(a) => self.areas.get(a),
            Scope::Global | Scope::User(_) | Scope::Device(_) => {
                for (_, edge) in self.edges.iter() {
                    if let Some(link) = edge.link(priority) {
                        out.push(Target {
                            link,
                            encodings: edge.all_encodings(),
                        });
                    }
                }
                return;
            }
        };
        for &(e, encodings) in members.into_iter().flatten() {
            if let Some(link) = self.edges.get(e).and_then(|edge| edge.link(priority)) {
                out.push(Target { link, encodings });
            }
        }
    }

    /// The link of edge node `node_id` for `priority` (the Low link while its High one is down).
    pub fn node_link(&self, node_id: &str, priority: Priority) -> Option<LinkId> {
        let e = self.by_node.get(node_id)?;
        self.edges.get(*e)?.link(priority)
    }

    /// Edge nodes with at least one link to this shard.
    pub fn edges(&self) -> usize {
        self.edges.len()
    }

    /// Rooms some edge of this shard has viewers of.
    pub fn rooms_watched(&self) -> usize {
        self.rooms.len()
    }

    /// Every link this route knows.
    pub fn links(&self) -> impl Iterator<Item = LinkId> + '_ {
        self.links.keys().copied()
    }
}

fn set_member<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Vec<(usize, u8)>>,
    key: K,
    e: usize,
    encodings: u8,
) {
    let members = map.entry(key).or_default();
    match members.iter_mut().find(|(m, _)| *m == e) {
        Some(slot) => slot.1 = encodings,
        None => members.push((e, encodings)),
    }
}

fn remove_member<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Vec<(usize, u8)>>,
    key: K,
    e: usize,
) {
    if let Some(members) = map.get_mut(&key) {
        members.retain(|(m, _)| *m != e);
        if members.is_empty() {
            map.remove(&key);
        }
    }
}

fn sub_total(totals: &mut HashMap<RoomId, u64>, room: RoomId, n: u32) {
    if let Some(t) = totals.get_mut(&room) {
        *t = t.saturating_sub(n as u64);
        if *t == 0 {
            totals.remove(&room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BR: u8 = 4;
    const ZL: u8 = 2;

    fn targets(r: &Route, scope: Scope, p: Priority) -> Vec<(LinkId, u8)> {
        let mut out = Vec::new();
        r.targets(&scope, p, &mut out);
        let mut v: Vec<_> = out.into_iter().map(|t| (t.link, t.encodings)).collect();
        v.sort();
        v
    }

    #[test]
    fn rooms_go_only_to_interested_edges_on_the_right_link() {
        let mut r = Route::new();
        r.link_up("a", Priority::Low, 1);
        r.link_up("a", Priority::High, 2);
        r.link_up("b", Priority::Low, 3);
        r.sub(1, &Interest::Room(RoomId(10)), BR);
        r.sub(3, &Interest::Room(RoomId(10)), BR | ZL);
        r.sub(3, &Interest::Room(RoomId(11)), BR);
        assert_eq!(
            targets(&r, Scope::Room(RoomId(10)), Priority::Low),
            vec![(1, BR), (3, BR | ZL)]
        );
        // b has no High link yet: its Low link carries high batches meanwhile.
        assert_eq!(
            targets(&r, Scope::Room(RoomId(10)), Priority::High),
            vec![(2, BR), (3, BR | ZL)]
        );
        assert_eq!(
            targets(&r, Scope::Room(RoomId(11)), Priority::Low),
            vec![(3, BR)]
        );
        assert!(targets(&r, Scope::Room(RoomId(12)), Priority::Low).is_empty());
        r.unsub(3, &Interest::Room(RoomId(11)));
        assert!(targets(&r, Scope::Room(RoomId(11)), Priority::Low).is_empty());
        // Empty encodings = no viewers.
        r.sub(1, &Interest::Room(RoomId(10)), 0);
        assert_eq!(
            targets(&r, Scope::Room(RoomId(10)), Priority::Low),
            vec![(3, BR | ZL)]
        );
        assert_eq!(r.rooms_watched(), 1);
    }

    #[test]
    fn areas_and_global() {
        let mut r = Route::new();
        r.link_up("a", Priority::Low, 1);
        r.link_up("b", Priority::Low, 2);
        r.sub(1, &Interest::Area(AreaId(3)), BR);
        r.sub(2, &Interest::Room(RoomId(1)), ZL);
        assert_eq!(
            targets(&r, Scope::Area(AreaId(3)), Priority::Low),
            vec![(1, BR)]
        );
        assert!(targets(&r, Scope::Room(RoomId(3)), Priority::Low).is_empty());
        // Global goes everywhere, in the encodings each edge's viewers use.
        assert_eq!(
            targets(&r, Scope::Global, Priority::Low),
            vec![(1, BR), (2, ZL)]
        );
        r.unsub(2, &Interest::Room(RoomId(1)));
        assert_eq!(
            targets(&r, Scope::Global, Priority::Low),
            vec![(1, BR), (2, BR)]
        );
    }

    #[test]
    fn link_loss_clears_interest_and_resub_restores_it() {
        let mut r = Route::new();
        r.link_up("a", Priority::Low, 1);
        r.link_up("a", Priority::High, 2);
        r.sub(1, &Interest::Room(RoomId(10)), BR);
        r.counts(1, &[(RoomId(10), 5)]);
        assert_eq!(r.total(RoomId(10)), Some(5));
        r.link_down(1);
        assert!(targets(&r, Scope::Room(RoomId(10)), Priority::High).is_empty());
        assert_eq!(r.total(RoomId(10)), None);
        assert_eq!(r.edges(), 1);
        r.link_up("a", Priority::Low, 3);
        r.sub(3, &Interest::Room(RoomId(10)), BR);
        assert_eq!(
            targets(&r, Scope::Room(RoomId(10)), Priority::High),
            vec![(2, BR)]
        );
        assert_eq!(
            targets(&r, Scope::Room(RoomId(10)), Priority::Low),
            vec![(3, BR)]
        );
        // A reconnect that replaces a live Low link also starts from no interest.
        let up = r.link_up("a", Priority::Low, 4);
        assert_eq!(up.replaced, Some(3));
        assert!(targets(&r, Scope::Room(RoomId(10)), Priority::Low).is_empty());
        r.link_down(3); // the replaced link closing later changes nothing
        r.link_down(4);
        r.link_down(2);
        assert_eq!(r.edges(), 0);
        assert_eq!(r.links().count(), 0);
    }

    #[test]
    fn top_rooms_are_the_busiest_first() {
        let mut r = Route::new();
        for (link, node) in [(1, "e1"), (2, "e2")] {
            r.link_up(node, Priority::Low, link);
            for room in 1..=4 {
                r.sub(link, &Interest::Room(RoomId(room)), BR);
            }
        }
        r.counts(1, &[(RoomId(1), 3), (RoomId(2), 10), (RoomId(3), 1)]);
        r.counts(2, &[(RoomId(1), 4), (RoomId(4), 7)]);
        assert_eq!(r.top(3), [(RoomId(2), 10), (RoomId(1), 7), (RoomId(4), 7)]);
        assert_eq!(r.top(10).len(), 4);
        assert!(r.top(0).is_empty());
    }

    #[test]
    fn fleet_counts_sum_edges() {
        let mut r = Route::new();
        r.link_up("a", Priority::Low, 1);
        r.link_up("b", Priority::Low, 2);
        r.sub(1, &Interest::Room(RoomId(1)), BR);
        r.sub(2, &Interest::Room(RoomId(1)), BR);
        r.counts(1, &[(RoomId(1), 3)]);
        r.counts(2, &[(RoomId(1), 4)]);
        r.counts(1, &[(RoomId(1), 5)]);
        assert_eq!(r.total(RoomId(1)), Some(9));
        let mut out = Vec::new();
        r.fleet_counts(&mut out);
        out.sort();
        assert_eq!(
            out,
            vec![(1, vec![(RoomId(1), 9)]), (2, vec![(RoomId(1), 9)])]
        );
        r.counts(2, &[(RoomId(1), 0)]);
        assert_eq!(r.total(RoomId(1)), Some(5));
        r.unsub(1, &Interest::Room(RoomId(1)));
        assert_eq!(r.total(RoomId(1)), None);
    }
}
