//! The probe protocol: BFD-style liveness over QUIC datagrams, and hop-by-hop flooding of
//! local evidence (neighbour state, site health and load) in the replies.
//!
//! Every router dials each neighbour (one connection per neighbour per direction) and sends a
//! [`Probe::Ping`] datagram on it every `interval` (default 100 ms). The neighbour answers with a
//! [`Probe::Pong`] that echoes the sequence number and carries a digest: its own [`Entry`] plus
//! the freshest entries it learned from its own neighbours. An entry is originated by one node
//! (`origin`, `generation` = its clock in ns) and says which of the origin's neighbours it sees
//! up (with RTT) or down, and, for a site, each service's health, active streams and capacity; it
//! travels with its age (how long ago its origin made it). Receivers keep one entry per origin
//! (`routes::Evidence::learn`: the origin's own word, else the youngest copy) and drop it
//! when it is a TTL old, so a site's death reaches an edge behind a transit one probe interval
//! after the transit sees it (the transit's own entry says "link to the site down").
//!
//! Wire format (big-endian): `u8 type (1 ping, 2 pong)`, `u64 seq`; pong adds `u8 entry count`,
//! then per entry: name origin, `u64 generation`, `u8 n`, n × (name, `u8 up`, `u32 rtt_us`),
//! `u8 s`, s × (name service, `u8 healthy`, `u32 active`, `u32 capacity`); then extensions, each
//! `u8 kind`, `u16 len`, len bytes: kind 1 holds a `u32` age in milliseconds per entry, in order.
//! A name is `u8 len` (1..=63) + UTF-8. Routers from before the extensions read the entries and
//! ignore what follows; a receiver skips kinds it does not know. Decoding is bounded by the
//! datagram size and never panics.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use topology::{NodeId, ServiceName};

const PING: u8 = 1;
const PONG: u8 = 2;
const MAX_NAME: usize = 63;
/// A pong's bytes before its entries: type, sequence number, entry count.
const PONG_HEADER: usize = 10;
/// The kind of a pong's extension that carries the entries' ages.
const EXT_AGES: u8 = 1;
/// An extension's kind and length.
const EXT_HEADER: usize = 3;
/// What each entry adds to the ages extension.
const AGE_LEN: usize = 4;
/// The smallest datagram a pong may have to fit: quinn's at QUIC's smallest MTU (1,200 bytes)
/// is a little larger.
pub const MIN_DATAGRAM: usize = 1150;
/// Bound on list lengths in one entry / one digest.
pub const MAX_LIST: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourState {
    pub id: NodeId,
    pub up: bool,
    pub rtt_us: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    pub service: ServiceName,
    pub healthy: bool,
    pub active: u32,
    pub capacity: u32,
}

/// One node's view of itself, flooded hop by hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub origin: NodeId,
    /// Its origin's clock, in ns, when it made it, or one more than its previous entry's if the
    /// clock has not moved past that (no two entries of an origin share one): receivers tell
    /// copies of one entry from another by it, and compare it with no clock.
    pub generation: u64,
    pub neighbours: Vec<NeighbourState>,
    pub services: Vec<ServiceState>,
    /// How long ago its origin made it, in milliseconds: 0 from the origin, and each router
    /// that passes it on adds how long it held it (0 from a sender older than the field).
    pub age_ms: u32,
}

impl Entry {
    /// Same content, ignoring the generation and the age (a refresh that changes nothing).
    pub fn same_content(&self, other: &Entry) -> bool {
        self.origin == other.origin
            && self.services == other.services
            && self.neighbours.len() == other.neighbours.len()
            && self
                .neighbours
                .iter()
                .zip(&other.neighbours)
                .all(|(a, b)| a.id == b.id && a.up == b.up)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Ping { seq: u64 },
    Pong { seq: u64, entries: Vec<Entry> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("probe truncated")]
    Truncated,
    #[error("unknown probe type {0}")]
    Type(u8),
    #[error("bad name in probe")]
    Name,
    #[error("list too long in probe")]
    TooLong,
}

fn need(b: &impl Buf, n: usize) -> Result<(), ProbeError> {
    if b.remaining() < n {
        Err(ProbeError::Truncated)
    } else {
        Ok(())
    }
}

fn get_name(b: &mut impl Buf) -> Result<String, ProbeError> {
    need(b, 1)?;
    let n = b.get_u8() as usize;
    if n == 0 || n > MAX_NAME {
        return Err(ProbeError::Name);
    }
    need(b, n)?;
    let mut raw = [0u8; MAX_NAME];
    b.copy_to_slice(&mut raw[..n]);
    std::str::from_utf8(&raw[..n])
        .map(str::to_string)
        .map_err(|_| ProbeError::Name)
}

fn put_name(out: &mut BytesMut, s: &str) {
    let s = if s.len() > MAX_NAME { &s[..0] } else { s };
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

fn get_len(b: &mut impl Buf) -> Result<usize, ProbeError> {
    need(b, 1)?;
    let n = b.get_u8() as usize;
    if n > MAX_LIST {
        Err(ProbeError::TooLong)
    } else {
        Ok(n)
    }
}

/// Encoded size of a name.
fn name_len(s: &str) -> usize {
    1 + if s.len() > MAX_NAME { 0 } else { s.len() }
}

impl Entry {
    /// This entry cut to what fits in `budget` encoded bytes (`None`: not even its origin,
    /// generation and empty lists). The failure evidence goes first: the neighbours it sees down
    /// and the services it finds unhealthy, then the healthy services, then the neighbours up, each
    /// as long as it fits. A receiver takes a link or a service an entry does not mention as
    /// unreported (declared latency, no load), never as down.
    pub fn trimmed_to(&self, budget: usize) -> Option<Entry> {
        let mut used = name_len(self.origin.as_str()) + 8 + 1 + 1;
        if used > budget {
            return None;
        }
        let nb_len = |n: &NeighbourState| name_len(n.id.as_str()) + 5;
        let sv_len = |s: &ServiceState| name_len(s.service.as_str()) + 9;
        let mut fits = |n: usize| {
            let ok = used + n <= budget;
            if ok {
                used += n;
            }
            ok
        };
        let mut neighbours = Vec::new();
        let mut services = Vec::new();
        for n in self.neighbours.iter().filter(|n| !n.up).take(MAX_LIST) {
            if fits(nb_len(n)) {
                neighbours.push(n.clone());
            }
        }
        for healthy in [false, true] {
            for s in self.services.iter().filter(|s| s.healthy == healthy) {
                if services.len() < MAX_LIST && fits(sv_len(s)) {
                    services.push(s.clone());
                }
            }
        }
        for n in self.neighbours.iter().filter(|n| n.up) {
            if neighbours.len() < MAX_LIST && fits(nb_len(n)) {
                neighbours.push(n.clone());
            }
        }
        neighbours.sort_by(|a, b| a.id.cmp(&b.id));
        services.sort_by(|a, b| a.service.cmp(&b.service));
        Some(Entry {
            origin: self.origin.clone(),
            generation: self.generation,
            neighbours,
            services,
            age_ms: self.age_ms,
        })
    }

    /// The size of [`Entry::encode`]'s output.
    fn encoded_len(&self) -> usize {
        if self.neighbours.len() > MAX_LIST || self.services.len() > MAX_LIST {
            return self
                .trimmed_to(usize::MAX)
                .map_or(0, |cut| cut.encoded_len());
        }
        name_len(self.origin.as_str())
            + 8
            + 1
            + self
                .neighbours
                .iter()
                .map(|n| name_len(n.id.as_str()) + 5)
                .sum::<usize>()
            + 1
            + self
                .services
                .iter()
                .map(|s| name_len(s.service.as_str()) + 9)
                .sum::<usize>()
    }

    /// Encodes the entry. A list longer than [`MAX_LIST`] is cut as [`Entry::trimmed_to`] cuts:
    /// neighbours down and unhealthy services are kept first (the first `MAX_LIST` by id would
    /// leave out a down report of any neighbour beyond them).
    fn encode(&self, out: &mut BytesMut) {
        if (self.neighbours.len() > MAX_LIST || self.services.len() > MAX_LIST)
            && let Some(cut) = self.trimmed_to(usize::MAX)
        {
            return cut.encode(out);
        }
        put_name(out, self.origin.as_str());
        out.put_u64(self.generation);
        let n = self.neighbours.len().min(MAX_LIST);
        out.put_u8(n as u8);
        for nb in &self.neighbours[..n] {
            put_name(out, nb.id.as_str());
            out.put_u8(nb.up as u8);
            out.put_u32(nb.rtt_us);
        }
        let s = self.services.len().min(MAX_LIST);
        out.put_u8(s as u8);
        for sv in &self.services[..s] {
            put_name(out, sv.service.as_str());
            out.put_u8(sv.healthy as u8);
            out.put_u32(sv.active);
            out.put_u32(sv.capacity);
        }
    }

    fn decode(b: &mut impl Buf) -> Result<Entry, ProbeError> {
        let origin = NodeId::new(get_name(b)?);
        need(b, 8)?;
        let generation = b.get_u64();
        let n = get_len(b)?;
        let mut neighbours = Vec::with_capacity(n);
        for _ in 0..n {
            let id = NodeId::new(get_name(b)?);
            need(b, 5)?;
            neighbours.push(NeighbourState {
                id,
                up: b.get_u8() != 0,
                rtt_us: b.get_u32(),
            });
        }
        let s = get_len(b)?;
        let mut services = Vec::with_capacity(s);
        for _ in 0..s {
            let service = ServiceName::new(get_name(b)?);
            need(b, 9)?;
            services.push(ServiceState {
                service,
                healthy: b.get_u8() != 0,
                active: b.get_u32(),
                capacity: b.get_u32(),
            });
        }
        Ok(Entry {
            origin,
            generation,
            neighbours,
            services,
            age_ms: 0,
        })
    }
}

/// An upper bound on the pongs of `max_len` bytes a responder takes to carry each of `entries`
/// once ([`Probe::encode_pong`]'s round), whichever of them is its own. Behind the own entry (at
/// most half of the room when the learned ones need it) a pong ends when the next entry does not
/// fit, so two consecutive pongs take more than the room left, or when it carries 63 entries;
/// and every pong carries at least one. (Entries coming and going between pongs shift the round
/// by as many.)
pub fn rotation_bound(entries: &[Entry], max_len: usize) -> usize {
    let room = max_len.saturating_sub(PONG_HEADER + EXT_HEADER);
    let costs: Vec<usize> = entries.iter().map(|e| e.encoded_len() + AGE_LEN).collect();
    let own = costs
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .min(room.div_ceil(2));
    let left = room - own;
    if entries.is_empty() || left == 0 {
        return entries.len().max(1);
    }
    let bytes: usize = costs.iter().map(|c| (*c).min(left)).sum();
    let bound = (2 * bytes).div_ceil(left) + 1 + entries.len().div_ceil(MAX_LIST - 1);
    bound.min(entries.len()).max(1)
}

impl Probe {
    pub fn encode_ping(seq: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(9);
        b.put_u8(PING);
        b.put_u64(seq);
        b.freeze()
    }

    /// Encodes a pong: `entries[0]` (the responder's own entry) first, then as many of the
    /// other entries (learned ones) as fit in `max_len` bytes (and [`MAX_LIST`]), taken in order
    /// from index `start` of `entries[1..]` and wrapping around, then their ages (the
    /// extension). Returns the datagram and the `start` of the next pong: the first entry this
    /// one did not carry. A responder that passes it on pong after pong carries every entry in
    /// turn; always starting from the same place would send the same subset every time once
    /// there are more entries than fit, and the rest would never arrive.
    ///
    /// Room is shared so that both kinds always go: the own entry takes what the learned entries
    /// do not need, but when they need it, at most half of the room ([`Entry::trimmed_to`] cuts
    /// it: neighbours down first). The first learned entry of a pong goes cut to the room left
    /// when it does not fit whole (so does one larger than any pong), and the ones after it go
    /// whole or wait for the next pong, which they start. Every pong so carries at least one
    /// learned entry, and a round of all of them takes at most [`rotation_bound`] pongs.
    pub fn encode_pong(
        seq: u64,
        entries: &[Entry],
        start: usize,
        max_len: usize,
    ) -> (Bytes, usize) {
        match entries.split_first() {
            Some((own, learned)) => Self::encode_pong_parts(seq, own, learned, 0, start, max_len),
            None => {
                let mut out = BytesMut::with_capacity(PONG_HEADER);
                out.put_u8(PONG);
                out.put_u64(seq);
                out.put_u8(0);
                (out.freeze(), 0)
            }
        }
    }

    /// [`Probe::encode_pong`] of `own` and `learned`, the learned entries `aged_ms` older than
    /// their `age_ms` says (a digest reused since their ages were taken).
    pub fn encode_pong_parts(
        seq: u64,
        own: &Entry,
        learned: &[Entry],
        aged_ms: u32,
        start: usize,
        max_len: usize,
    ) -> (Bytes, usize) {
        let mut out = BytesMut::with_capacity(max_len.min(1500));
        out.put_u8(PONG);
        out.put_u64(seq);
        out.put_u8(0);
        // Each entry costs its encoding and its age; the ages' extension header is set aside.
        let cost = |e: &Entry| e.encoded_len() + AGE_LEN;
        let room = max_len.saturating_sub(PONG_HEADER + EXT_HEADER);
        // What the learned entries need of the room, counted up to half of it.
        let mut need = 0;
        for e in learned {
            if need >= room / 2 {
                break;
            }
            need += cost(e);
        }
        let own_room = room - need.min(room / 2);
        let mut ages: Vec<u32> = Vec::new();
        fn put(e: &Entry, aged: u32, out: &mut BytesMut, ages: &mut Vec<u32>) {
            e.encode(out);
            ages.push(e.age_ms.saturating_add(aged));
        }
        if cost(own) <= own_room {
            put(own, 0, &mut out, &mut ages);
        } else if let Some(cut) = own.trimmed_to(own_room.saturating_sub(AGE_LEN)) {
            put(&cut, 0, &mut out, &mut ages);
        }
        let n = learned.len();
        let first = if n == 0 { 0 } else { start % n };
        let mut next = first;
        for i in 0..n {
            if ages.len() >= MAX_LIST {
                break;
            }
            let at = (first + i) % n;
            let e = &learned[at];
            let used = out.len() + EXT_HEADER + AGE_LEN * ages.len();
            let left = max_len.saturating_sub(used);
            if cost(e) <= left {
                put(e, aged_ms, &mut out, &mut ages);
            } else if i == 0 {
                // Too large for the room of a whole pong: cut (a room too small even for its
                // origin carries nothing, and the round goes on).
                if let Some(cut) = e.trimmed_to(left.saturating_sub(AGE_LEN)) {
                    put(&cut, aged_ms, &mut out, &mut ages);
                }
            } else {
                // The next pong starts with it.
                break;
            }
            next = (at + 1) % n;
        }
        out[9] = ages.len() as u8;
        if !ages.is_empty() {
            out.put_u8(EXT_AGES);
            out.put_u16((AGE_LEN * ages.len()) as u16);
            for age in ages {
                out.put_u32(age);
            }
        }
        (out.freeze(), next)
    }

    /// A pong's echoed sequence number, read without decoding its entries (a receiver drops
    /// an answer it does not wait for before paying for them); `None` for anything else.
    pub fn pong_seq(b: &[u8]) -> Option<u64> {
        if *b.first()? != PONG {
            return None;
        }
        Some(u64::from_be_bytes(b.get(1..9)?.try_into().ok()?))
    }

    /// Decodes a probe. After a pong's entries come extensions, each `u8 kind`, `u16 len` and
    /// `len` bytes: a receiver skips the kinds it does not know, and a sender older than them
    /// sends none. What does not make an extension whole (a truncated one, or ages that are not
    /// one per entry) is ignored, as routers older than the extensions ignore it all.
    pub fn decode(mut b: impl Buf) -> Result<Probe, ProbeError> {
        need(&b, 9)?;
        let ty = b.get_u8();
        let seq = b.get_u64();
        match ty {
            PING => Ok(Probe::Ping { seq }),
            PONG => {
                let n = get_len(&mut b)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(Entry::decode(&mut b)?);
                }
                let mut aged = false;
                while b.remaining() >= EXT_HEADER {
                    let kind = b.get_u8();
                    let len = b.get_u16() as usize;
                    if b.remaining() < len {
                        break;
                    }
                    if kind == EXT_AGES && len == AGE_LEN * entries.len() && !aged {
                        for e in &mut entries {
                            e.age_ms = b.get_u32();
                        }
                        aged = true;
                    } else {
                        b.advance(len);
                    }
                }
                Ok(Probe::Pong { seq, entries })
            }
            t => Err(ProbeError::Type(t)),
        }
    }
}

/// Pings answered on one connection: a burst of [`PONG_BURST`], then one every [`PONG_EVERY`]
/// (250 a second). A neighbour probing at the shortest `--probe-interval` (10 ms), re-probes
/// included, sends at most 200 a second; past the budget a ping is ignored (counted in
/// `tasman_pings_ignored_total`), as a lost one would be.
pub const PONG_BURST: u32 = 32;
/// See [`PONG_BURST`].
pub const PONG_EVERY: std::time::Duration = std::time::Duration::from_millis(4);

/// A token bucket of pongs: [`PONG_BURST`] tokens, one more every [`PONG_EVERY`].
#[derive(Debug)]
pub struct PongBudget {
    tokens: u32,
    /// When the last token was earned (or when the bucket filled).
    since: tokio::time::Instant,
}

impl PongBudget {
    pub fn new(now: tokio::time::Instant) -> Self {
        PongBudget {
            tokens: PONG_BURST,
            since: now,
        }
    }

    /// Takes a token, if there is one at `now`.
    pub fn take(&mut self, now: tokio::time::Instant) -> bool {
        let earned = now.saturating_duration_since(self.since).as_nanos() / PONG_EVERY.as_nanos();
        if earned > 0 {
            if earned >= u128::from(PONG_BURST - self.tokens) {
                self.tokens = PONG_BURST;
                self.since = now;
            } else {
                // Less than PONG_BURST tokens: fits a u32.
                let earned = earned as u32;
                self.tokens += earned;
                self.since += PONG_EVERY * earned;
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(origin: &str) -> Entry {
        Entry {
            origin: origin.into(),
            generation: 42,
            neighbours: vec![NeighbourState {
                id: "t1".into(),
                up: false,
                rtt_us: 1500,
            }],
            services: vec![ServiceState {
                service: "chat".into(),
                healthy: true,
                active: 3,
                capacity: 10,
            }],
            age_ms: 0,
        }
    }

    #[test]
    fn pongs_come_in_a_burst_then_at_their_rate() {
        let t0 = tokio::time::Instant::now();
        let mut b = PongBudget::new(t0);
        let taken = |b: &mut PongBudget, at, n| (0..n).filter(|_| b.take(at)).count() as u32;
        assert_eq!(taken(&mut b, t0, 100), PONG_BURST);
        // 10 intervals later: 10 more, however many pings came.
        assert_eq!(taken(&mut b, t0 + PONG_EVERY * 10, 100), 10);
        // Part of an interval earns nothing, and the part is kept for the next one.
        let t1 = t0 + PONG_EVERY * 10 + PONG_EVERY / 2;
        assert_eq!(taken(&mut b, t1, 100), 0);
        assert_eq!(taken(&mut b, t0 + PONG_EVERY * 11, 100), 1);
        // A long silence refills the burst, no more.
        assert_eq!(taken(&mut b, t0 + PONG_EVERY * 10_000, 100), PONG_BURST);
        // A clock read out of order (never earlier in tokio, but) earns nothing and takes none.
        assert_eq!(taken(&mut b, t0, 5), 0);
    }

    #[test]
    fn a_pongs_sequence_number_is_read_without_its_entries() {
        let es = [entry("s1"), entry("s2")];
        let (pong, _) = Probe::encode_pong(7, &es, 0, 1200);
        assert_eq!(Probe::pong_seq(&pong), Some(7));
        assert_eq!(Probe::pong_seq(&pong[..9]), Some(7));
        assert_eq!(Probe::pong_seq(&pong[..8]), None);
        assert_eq!(Probe::pong_seq(&Probe::encode_ping(7)), None);
        assert_eq!(Probe::pong_seq(&[]), None);
    }

    #[test]
    fn pong_roundtrip_and_size_bound() {
        let es = [entry("s1"), entry("s2"), entry("s3")];
        let (b, _) = Probe::encode_pong(7, &es, 0, 1200);
        assert_eq!(
            Probe::decode(b).unwrap(),
            Probe::Pong {
                seq: 7,
                entries: es.to_vec()
            }
        );
        let (small, _) = Probe::encode_pong(7, &es, 0, 60);
        assert!(small.len() <= 60);
        assert!(
            matches!(Probe::decode(small).unwrap(), Probe::Pong { entries, .. } if entries[0].origin.as_str() == "s1")
        );
        assert_eq!(
            Probe::decode(Probe::encode_ping(9)).unwrap(),
            Probe::Ping { seq: 9 }
        );
    }

    #[test]
    fn pongs_in_turn_carry_every_entry_when_not_all_fit_in_one() {
        let own = entry("me");
        let learned: Vec<Entry> = (0..100).map(|i| entry(&format!("n{i:03}"))).collect();
        let entries: Vec<Entry> = std::iter::once(own)
            .chain(learned.iter().cloned())
            .collect();
        let per_pong = |b: Bytes| match Probe::decode(b).unwrap() {
            Probe::Pong { entries, .. } => entries,
            p => panic!("{p:?}"),
        };
        let (first, _) = Probe::encode_pong(1, &entries, 0, 1200);
        let fit = per_pong(first).len() - 1;
        assert!(fit > 1 && fit < learned.len(), "{fit} entries fit one pong");
        let mut seen = std::collections::BTreeSet::new();
        let mut start = 0;
        for seq in 0..learned.len().div_ceil(fit) as u64 {
            let (b, next) = Probe::encode_pong(seq, &entries, start, 1200);
            start = next;
            let got = per_pong(b);
            assert_eq!(
                got[0].origin.as_str(),
                "me",
                "the own entry always goes first"
            );
            seen.extend(got[1..].iter().map(|e| e.origin.clone()));
        }
        let missing: Vec<_> = learned
            .iter()
            .filter(|e| !seen.contains(&e.origin))
            .map(|e| e.origin.to_string())
            .collect();
        assert!(missing.is_empty(), "never carried: {missing:?}");
    }

    /// An entry larger than any pong goes cut, first in its pong, and the round goes on after it.
    /// (It was skipped for good.)
    #[test]
    fn an_entry_too_large_for_any_pong_goes_cut() {
        let mut huge = entry("huge");
        huge.neighbours = (0..60)
            .map(|i| NeighbourState {
                id: NodeId::new(format!("neighbour-with-a-long-name-{i:03}")),
                up: i != 59,
                rtt_us: 1,
            })
            .collect();
        let entries = [entry("me"), huge.clone(), entry("a"), entry("b")];
        let names = |b: Bytes| {
            let Probe::Pong { entries: got, .. } = Probe::decode(b).unwrap() else {
                panic!()
            };
            got
        };
        let (b, next) = Probe::encode_pong(1, &entries, 0, 1200);
        assert!(b.len() <= 1200);
        let got = names(b);
        let origins: Vec<_> = got.iter().map(|e| e.origin.as_str()).collect();
        assert_eq!(origins, ["me", "huge"]);
        assert!(got[1].neighbours.len() < huge.neighbours.len());
        assert!(
            got[1].neighbours.contains(&huge.neighbours[59]),
            "down first"
        );
        assert_eq!(next, 1);
        let (b, next) = Probe::encode_pong(2, &entries, next, 1200);
        let origins: Vec<_> = names(b).iter().map(|e| e.origin.to_string()).collect();
        assert_eq!(origins, ["me", "a", "b"]);
        assert_eq!(next, 0, "the round starts again with the huge one");
    }

    /// A transit with 70 links whose 70th neighbour (by id) died: the entry fits a datagram whole,
    /// but a list holds at most `MAX_LIST`; the neighbours down are the ones kept. (The first 64 by
    /// id were sent, and the down report never left the router.)
    #[test]
    fn a_neighbour_down_beyond_the_list_bound_is_reported() {
        let own = Entry {
            origin: "transit".into(),
            generation: 7,
            neighbours: (0..70)
                .map(|i| NeighbourState {
                    id: NodeId::new(format!("n{i:02}")),
                    up: i != 69,
                    rtt_us: 100,
                })
                .collect(),
            services: Vec::new(),
            age_ms: 0,
        };
        let (pong, _) = Probe::encode_pong(1, &[own], 0, 1500);
        let Probe::Pong { entries, .. } = Probe::decode(pong).unwrap() else {
            panic!("not a pong");
        };
        let sent = &entries[0].neighbours;
        assert_eq!(sent.len(), MAX_LIST);
        let down: Vec<_> = sent
            .iter()
            .filter(|n| !n.up)
            .map(|n| n.id.as_str())
            .collect();
        assert_eq!(down, ["n69"], "the neighbour down is not reported");
    }

    /// A hub's pongs (its own entry as large as a datagram or most of one) carry every learned
    /// entry within as many pongs as there are entries, those too large for the room left cut
    /// to fit (their neighbours down first). (The own entry was cut to the whole datagram, and a
    /// learned entry that did not fit behind it was skipped for good: routers two hops from a
    /// hub never learned its neighbours' links down.)
    #[test]
    fn a_hubs_pongs_carry_every_learned_entry_in_turn() {
        let hub = |origin: &str, n: usize| Entry {
            origin: origin.into(),
            generation: 7,
            neighbours: (0..n)
                .map(|i| NeighbourState {
                    id: NodeId::new(format!("{origin}-{i:0>w$}", w = 19 - origin.len())),
                    up: i % 10 != 3,
                    rtt_us: 1000,
                })
                .collect(),
            services: Vec::new(),
            age_ms: 0,
        };
        let size = |e: &Entry| {
            let mut b = BytesMut::new();
            e.encode(&mut b);
            b.len()
        };
        let max = 1160;
        // 20-character names: the own entry fits a datagram whole with 30 links, not with 50.
        for own_links in [30, 50] {
            let own = hub("hub", own_links);
            // Another hub's entry, larger than a datagram; a relayer's of 383 bytes; small ones.
            let mut learned = vec![hub("far-hub", 60), hub("relay", 14)];
            assert!(size(&learned[0]) > max, "{}", size(&learned[0]));
            if own_links == 30 {
                assert!(size(&own) < max && size(&own) + size(&learned[1]) + 10 > max);
            } else {
                assert!(size(&own) > max);
            }
            learned.extend((0..8).map(|i| entry(&format!("s{i}"))));
            learned.sort_by(|a, b| a.origin.cmp(&b.origin));
            let entries: Vec<Entry> = std::iter::once(own.clone())
                .chain(learned.iter().cloned())
                .collect();
            let mut seen: std::collections::BTreeMap<NodeId, Vec<NeighbourState>> =
                Default::default();
            let mut start = 0;
            for seq in 0..learned.len() as u64 {
                let (b, next) = Probe::encode_pong(seq, &entries, start, max);
                assert!(b.len() <= max, "{}", b.len());
                start = next;
                let Probe::Pong { entries: got, .. } = Probe::decode(b).unwrap() else {
                    panic!("not a pong");
                };
                assert_eq!(got[0].origin.as_str(), "hub", "the own entry goes first");
                for n in own.neighbours.iter().filter(|n| !n.up) {
                    assert!(got[0].neighbours.contains(n), "own {} down not sent", n.id);
                }
                for e in &got[1..] {
                    seen.entry(e.origin.clone())
                        .or_default()
                        .extend(e.neighbours.iter().cloned());
                }
            }
            for e in &learned {
                let Some(carried) = seen.get(&e.origin) else {
                    panic!("{own_links} links: {} never carried", e.origin);
                };
                for n in e.neighbours.iter().filter(|n| !n.up) {
                    assert!(
                        carried.contains(n),
                        "{own_links} links: {}--{} down never carried",
                        e.origin,
                        n.id
                    );
                }
            }
        }
    }

    /// A digest made earlier goes out with the ages its entries gained since it was made
    /// (saturating at `u32::MAX`); the router's own entry is of age 0.
    #[test]
    fn a_reused_digest_goes_out_with_the_ages_it_gained_since() {
        let mut es = [entry("me"), entry("a"), entry("b")];
        es[1].age_ms = 1500;
        es[2].age_ms = u32::MAX - 3;
        let (pong, _) = Probe::encode_pong_parts(3, &es[0], &es[1..], 40, 0, 1200);
        let Ok(Probe::Pong { seq: 3, entries }) = Probe::decode(pong) else {
            panic!("not a pong");
        };
        let ages: Vec<u32> = entries.iter().map(|e| e.age_ms).collect();
        assert_eq!(
            ages,
            [0, 1540, u32::MAX],
            "own entry 0 ms; learned ones aged"
        );
    }

    /// Ages ride in an extension after the entries, which routers older than it never read: the
    /// pong up to the extension is a pong of the same entries (of age 0). An extension of an
    /// unknown kind is skipped, and one that is broken is ignored.
    #[test]
    fn ages_ride_in_an_extension_older_routers_skip() {
        let mut es = [entry("me"), entry("a"), entry("b")];
        es[1].age_ms = 1500;
        es[2].age_ms = 7;
        let (pong, _) = Probe::encode_pong(3, &es, 0, 1200);
        let pong_of = |b: &[u8]| match Probe::decode(b) {
            Ok(Probe::Pong { seq: 3, entries }) => entries,
            p => panic!("{p:?}"),
        };
        assert_eq!(pong_of(&pong), es);
        let ages = EXT_HEADER + AGE_LEN * es.len();
        let old = &pong[..pong.len() - ages];
        let unaged: Vec<Entry> = es
            .iter()
            .map(|e| Entry {
                age_ms: 0,
                ..e.clone()
            })
            .collect();
        assert_eq!(pong_of(old), unaged);
        let mut unknown = BytesMut::from(old);
        unknown.put_u8(9);
        unknown.put_u16(2);
        unknown.put_u16(0xffff);
        unknown.extend_from_slice(&pong[old.len()..]);
        assert_eq!(pong_of(&unknown), es);
        assert_eq!(pong_of(&pong[..pong.len() - 1]), unaged);
    }

    proptest! {
        #[test]
        fn random_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = Probe::decode(&bytes[..]);
        }
    }

    /// A hub whose own entry is larger than a datagram (50 neighbours with 20-character names
    /// at quinn's initial datagram size) still sends it, cut to fit: every neighbour it sees
    /// down and every service first, then as many of those up as fit. (The entry was left out:
    /// routers behind the hub never learned its links down, nor its sites' health.)
    #[test]
    fn an_own_entry_larger_than_a_datagram_goes_cut_to_fit() {
        let name = |i: usize| format!("transit-node-{i:07}");
        let own = Entry {
            origin: "hub".into(),
            generation: 7,
            neighbours: (0..50)
                .map(|i| NeighbourState {
                    id: NodeId::new(name(i)),
                    up: i % 10 != 3,
                    rtt_us: 1000 + i as u32,
                })
                .collect(),
            services: vec![ServiceState {
                service: "chat".into(),
                healthy: false,
                active: 1,
                capacity: 2,
            }],
            age_ms: 0,
        };
        let mut whole = BytesMut::new();
        own.encode(&mut whole);
        let max = 1160;
        assert!(whole.len() > max, "the entry fits whole: {}", whole.len());
        let (pong, _) = Probe::encode_pong(1, &[own.clone(), entry("s1")], 0, max);
        assert!(pong.len() <= max, "{}", pong.len());
        let Probe::Pong { entries, .. } = Probe::decode(pong).unwrap() else {
            panic!("not a pong");
        };
        let sent = &entries[0];
        assert_eq!(sent.origin.as_str(), "hub");
        assert_eq!(sent.generation, 7);
        assert_eq!(sent.services, own.services);
        let down: Vec<_> = own.neighbours.iter().filter(|n| !n.up).collect();
        assert_eq!(down.len(), 5);
        for n in down {
            assert!(sent.neighbours.contains(n), "{} is down but not sent", n.id);
        }
        let up = sent.neighbours.iter().filter(|n| n.up).count();
        assert!(up > 30 && up < 45, "{up} neighbours up sent");
        assert!(sent.neighbours.iter().all(|n| own.neighbours.contains(n)));
        assert!(sent.neighbours.is_sorted_by(|a, b| a.id < b.id));
        // Too small even for the origin: nothing, and no panic.
        let (tiny, _) = Probe::encode_pong(1, &[own], 0, 20);
        assert!(
            matches!(Probe::decode(tiny).unwrap(), Probe::Pong { entries, .. } if entries.is_empty())
        );
    }
}
