//! `to_yaml` then `load` gives back the same topology, for random synthetic fabrics with random
//! admin states, weights, residency, affinity and pools.

use proptest::prelude::*;
use topology::synth::{self, Params};
use topology::{AdminState, Affinity, CountryCode, Pool, PoolName, Region, load, to_yaml};

fn state(i: u8) -> AdminState {
    [AdminState::Up, AdminState::Drain, AdminState::Down][usize::from(i % 3)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn to_yaml_then_load_is_identity(
        nodes in 2usize..120,
        extra in 0usize..300,
        seed in any::<u64>(),
        states in proptest::collection::vec(any::<u8>(), 8),
    ) {
        let mut t = synth::topology(&Params { nodes, links: nodes - 1 + extra, services: 3, seed, ..Params::default() });
        for (i, s) in states.iter().enumerate() {
            if let Some(n) = t.nodes.get_mut(usize::from(*s) % nodes) {
                n.state = state(*s);
            }
            let nl = t.links.len();
            if let Some(l) = t.links.get_mut((i * 7 + usize::from(*s)) % nl) {
                l.state = state(s.wrapping_add(1));
            }
        }
        if let Some(site) = t.nodes.iter_mut().find(|n| !n.serves.is_empty()) {
            site.serves[0].weight = 1 + u32::from(states[0]);
        }
        if states[1] % 2 == 1 {
            t.services[2].affinity = Affinity::SourceIp;
        }
        t.services[1].residency.countries = vec![CountryCode::parse("AU").expect("AU")];
        t.services[1].residency.regions = vec![Region::new("region-0")];
        // Keep the residency satisfiable: node 0 is a site serving every service.
        t.nodes[0].country = CountryCode::parse("AU").expect("AU");
        t.nodes[0].region = Region::new("region-0");
        t.nodes[0].state = AdminState::Up;
        t.pools.push(Pool { name: PoolName::new("circuit-vips"), prefix: "198.19.0.0/16".parse().expect("prefix") });

        let text = to_yaml(&t);
        let back = load(&text).map_err(|d| TestCaseError::fail(format!("{d:#?}\n{text}")))?;
        prop_assert_eq!(back.topology, t);
    }
}
