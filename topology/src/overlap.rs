//! Overlap queries over many IP prefixes in O(log n) each, for validation: a document may hold
//! hundreds of thousands of VIPs or pools, and comparing each with every other one is quadratic.
//!
//! Both queries answer "the earliest of these prefixes that overlaps that one", the earliest by
//! an order the caller gives (the order in which the document declared them), so that a
//! diagnostic names the same other prefix a first-to-last scan would.
//!
//! Two CIDR prefixes overlap exactly when one contains the other, and prefixes of different
//! families never overlap.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use ipnetwork::IpNetwork;

/// `(is IPv6, first address, last address)`: IPv4 sorts before IPv6, so that one address space
/// never runs into the other.
type Span = (bool, u128, u128);

fn span(p: IpNetwork) -> Span {
    match p {
        IpNetwork::V4(n) => (
            false,
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNetwork::V6(n) => {
            let first = u128::from(n.network());
            let host = u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0);
            (true, first, first | host)
        }
    }
}

const NONE: usize = usize::MAX;

/// Range minimum over fixed positions whose values only ever go down.
struct MinTree {
    n: usize,
    t: Vec<usize>,
}

impl MinTree {
    fn new(n: usize) -> MinTree {
        MinTree {
            n,
            t: vec![NONE; 2 * n],
        }
    }

    fn lower(&mut self, i: usize, v: usize) {
        let mut i = i + self.n;
        self.t[i] = self.t[i].min(v);
        while i > 1 {
            i /= 2;
            self.t[i] = self.t[2 * i].min(self.t[2 * i + 1]);
        }
    }

    /// The least value at positions `lo..hi`, or [`NONE`].
    fn min(&self, lo: usize, hi: usize) -> usize {
        let (mut lo, mut hi) = (lo + self.n, hi + self.n);
        let mut m = NONE;
        while lo < hi {
            if lo & 1 == 1 {
                m = m.min(self.t[lo]);
                lo += 1;
            }
            if hi & 1 == 1 {
                hi -= 1;
                m = m.min(self.t[hi]);
            }
            lo /= 2;
            hi /= 2;
        }
        m
    }
}

/// A growing set of prefixes, pairwise disjoint within each group `G` (the caller adds only
/// prefixes that overlap none already added in their group), with every prefix that may be added
/// known in advance (the candidates).
pub(crate) struct Disjoint<G> {
    /// `(group, family, first address)` of every candidate, sorted.
    keys: Vec<(G, bool, u128)>,
    /// Candidate index to its position in `keys`.
    at: Vec<usize>,
    /// The order of the candidate added at each position of `keys`.
    added_min: MinTree,
    /// The added prefixes: `(group, family, first)` to `(last, order)`.
    added: BTreeMap<(G, bool, u128), (u128, usize)>,
}

impl<G: Ord + Copy> Disjoint<G> {
    pub(crate) fn new(candidates: impl Iterator<Item = (G, IpNetwork)>) -> Disjoint<G> {
        let mut keyed: Vec<((G, bool, u128), usize)> = candidates
            .enumerate()
            .map(|(i, (g, p))| {
                let (v6, first, _) = span(p);
                ((g, v6, first), i)
            })
            .collect();
        keyed.sort_unstable();
        let mut at = vec![0; keyed.len()];
        for (pos, (_, i)) in keyed.iter().enumerate() {
            at[*i] = pos;
        }
        Disjoint {
            added_min: MinTree::new(keyed.len()),
            keys: keyed.into_iter().map(|(k, _)| k).collect(),
            at,
            added: BTreeMap::new(),
        }
    }

    /// The least order of the added prefixes of group `g` that overlap `p`.
    pub(crate) fn first_overlap(&self, g: G, p: IpNetwork) -> Option<usize> {
        let (v6, first, last) = span(p);
        // One added prefix that starts before `p` and reaches it contains it; the added ones
        // being disjoint, no other can overlap `p` then.
        if let Some((&(og, ov6, _), &(olast, order))) =
            self.added.range(..(g, v6, first)).next_back()
            && og == g
            && ov6 == v6
            && olast >= first
        {
            return Some(order);
        }
        // Otherwise the ones that overlap `p` are those that start within it.
        let lo = self.keys.partition_point(|k| *k < (g, v6, first));
        let hi = self.keys.partition_point(|k| *k <= (g, v6, last));
        let m = self.added_min.min(lo, hi);
        (m != NONE).then_some(m)
    }

    /// Adds candidate `candidate` (group `g`, prefix `p`), which overlaps no added prefix of its
    /// group, with `order`.
    pub(crate) fn add(&mut self, candidate: usize, g: G, p: IpNetwork, order: usize) {
        let (v6, first, last) = span(p);
        self.added_min.lower(self.at[candidate], order);
        self.added.insert((g, v6, first), (last, order));
    }
}

/// For each of `queries`, the least order among `items` (prefix, order; they may overlap each
/// other) whose prefix overlaps it. O((items + queries) log (items + queries)).
pub(crate) fn first_overlaps(
    items: &[(IpNetwork, usize)],
    queries: &[IpNetwork],
) -> Vec<Option<usize>> {
    // Items by (family, first, widest first): a prefix comes after every prefix containing it.
    let mut sorted: Vec<(Span, usize)> = items.iter().map(|&(p, o)| (span(p), o)).collect();
    sorted.sort_unstable_by_key(|&((v6, first, last), o)| (v6, first, Reverse(last), o));
    let mut inside = MinTree::new(sorted.len());
    for (i, (_, o)) in sorted.iter().enumerate() {
        inside.lower(i, *o);
    }
    let mut out: Vec<usize> = queries
        .iter()
        .map(|&q| {
            // The items that start within `q`: inside it, or containing it from its first address.
            let (v6, first, last) = span(q);
            let lo = sorted.partition_point(|((iv6, ifirst, _), _)| (*iv6, *ifirst) < (v6, first));
            let hi = sorted.partition_point(|((iv6, ifirst, _), _)| (*iv6, *ifirst) <= (v6, last));
            inside.min(lo, hi)
        })
        .collect();
    // The items that contain a query from before it: one sweep in the same order, items before
    // an equal query, keeping the chain of items that contain the current address (nested, the
    // innermost on top) with the least order along it.
    let mut order: Vec<usize> = (0..queries.len()).collect();
    order.sort_unstable_by_key(|&i| {
        let (v6, first, last) = span(queries[i]);
        (v6, first, Reverse(last))
    });
    let mut chain: Vec<(bool, u128, usize)> = Vec::new();
    let mut pending = sorted.iter().peekable();
    for qi in order {
        let q = span(queries[qi]);
        let q_key = (q.0, q.1, Reverse(q.2));
        while let Some(&((v6, first, last), o)) =
            pending.next_if(|((v6, first, last), _)| (*v6, *first, Reverse(*last)) <= q_key)
        {
            pop_before(&mut chain, v6, first);
            let least = chain.last().map_or(o, |&(_, _, m)| m.min(o));
            chain.push((v6, last, least));
        }
        pop_before(&mut chain, q.0, q.1);
        if let Some(&(_, _, m)) = chain.last() {
            out[qi] = out[qi].min(m);
        }
    }
    out.into_iter().map(|m| (m != NONE).then_some(m)).collect()
}

/// Drops from the chain the prefixes that end before address `first` of family `v6`.
fn pop_before(chain: &mut Vec<(bool, u128, usize)>, v6: bool, first: u128) {
    while chain
        .last()
        .is_some_and(|&(cv6, clast, _)| cv6 != v6 || clast < first)
    {
        chain.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
        a.contains(b.network()) || b.contains(a.network())
    }

    /// Prefixes crowded into a few small ranges of both families, so that many overlap.
    fn arb_prefix() -> impl Strategy<Value = IpNetwork> {
        prop_oneof![
            (0u32..64, 26u8..=32).prop_map(|(a, len)| {
                let n =
                    IpNetwork::new(std::net::Ipv4Addr::from(0xC612_0000 | a).into(), len).unwrap();
                IpNetwork::new(n.network(), len).unwrap()
            }),
            (0u128..64, 122u8..=128).prop_map(|(a, len)| {
                let ip = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | a);
                let n = IpNetwork::new(ip.into(), len).unwrap();
                IpNetwork::new(n.network(), len).unwrap()
            }),
            Just("0.0.0.0/0".parse().unwrap()),
            Just("::/0".parse().unwrap()),
        ]
    }

    proptest! {
        /// Adding in order whatever overlaps nothing added in its group, the first overlap found is
        /// the one a scan of the added ones in order finds.
        #[test]
        fn disjoint_finds_what_a_scan_finds(
            input in proptest::collection::vec((0u16..3, arb_prefix()), 0..60)
        ) {
            let mut d = Disjoint::new(input.iter().copied());
            let mut added: Vec<(u16, IpNetwork)> = Vec::new();
            for (i, &(g, p)) in input.iter().enumerate() {
                let scan = added.iter().position(|&(ag, ap)| ag == g && overlaps(ap, p));
                prop_assert_eq!(d.first_overlap(g, p), scan, "{} {}", g, p);
                if scan.is_none() {
                    d.add(i, g, p, added.len());
                    added.push((g, p));
                }
            }
        }

        /// The least order of the items that overlap each query is the one a scan finds.
        #[test]
        fn first_overlaps_finds_what_a_scan_finds(
            items in proptest::collection::vec(arb_prefix(), 0..40),
            queries in proptest::collection::vec(arb_prefix(), 0..40),
        ) {
            let ordered: Vec<(IpNetwork, usize)> =
                items.iter().enumerate().map(|(o, &p)| (p, o)).collect();
            let got = first_overlaps(&ordered, &queries);
            for (q, g) in queries.iter().zip(got) {
                let scan = items.iter().position(|&p| overlaps(p, *q));
                prop_assert_eq!(g, scan, "{}", q);
            }
        }
    }
}
