use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn net(s: &str) -> IpNet {
    IpNet::parse(s).unwrap_or_else(|| panic!("{s}: not a CIDR"))
}

#[test]
fn an_address_gets_limit_connections_and_its_next_is_refused() {
    let t = PerClient::new(vec![]);
    let before = crate::metrics::global().connections_refused.get(&REFUSED_REASON);
    let mut held: Vec<ClientGuard> =
        (0..3).map(|i| t.admit(ip("192.0.2.1"), 3).unwrap_or_else(|| panic!("#{i}"))).collect();
    assert_eq!(t.open(ip("192.0.2.1")), 3);
    assert!(t.admit(ip("192.0.2.1"), 3).is_none(), "a fourth from the same address");
    assert_eq!(t.open(ip("192.0.2.1")), 3, "a refusal is not counted as open");
    // Other addresses are not affected.
    let other = t.admit(ip("192.0.2.2"), 3);
    assert!(other.is_some());
    assert!(
        crate::metrics::global().connections_refused.get(&REFUSED_REASON) > before,
        "the refusal is counted in portcullis_connections_refused_total"
    );
    // Closing one frees its place.
    held.pop();
    assert_eq!(t.open(ip("192.0.2.1")), 2);
    assert!(t.admit(ip("192.0.2.1"), 3).is_some());
}

#[test]
fn an_entry_is_removed_when_its_last_connection_ends() {
    let t = PerClient::new(vec![]);
    // A spray of addresses, each one connection: entries only while they are open.
    let spray: Vec<ClientGuard> =
        (0..=255u8).filter_map(|i| t.admit(IpAddr::from([198, 51, 100, i]), 1)).collect();
    assert_eq!(t.clients(), 256);
    let a = t.admit(ip("203.0.113.9"), 2);
    let b = t.admit(ip("203.0.113.9"), 2);
    assert_eq!(t.clients(), 257);
    drop(spray);
    assert_eq!(t.clients(), 1);
    drop(a);
    assert_eq!((t.clients(), t.open(ip("203.0.113.9"))), (1, 1));
    drop(b);
    assert_eq!((t.clients(), t.open(ip("203.0.113.9"))), (0, 0), "no entry left at zero");
    // A refused connection leaves no entry either.
    let only = t.admit(ip("203.0.113.10"), 1);
    assert!(t.admit(ip("203.0.113.10"), 1).is_none());
    drop(only);
    assert_eq!(t.clients(), 0);
}

#[test]
fn ipv6_counts_per_64_and_mapped_ipv4_as_its_ipv4_address() {
    let t = PerClient::new(vec![]);
    let a = t.admit(ip("2001:db8:1:2::1"), 2);
    let b = t.admit(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 2);
    assert!(a.is_some() && b.is_some());
    assert!(t.admit(ip("2001:db8:1:2:dead:beef::7"), 2).is_none(), "the same /64");
    assert!(t.admit(ip("2001:db8:1:3::1"), 2).is_some(), "the next /64 is another client");
    assert_eq!(t.open(ip("2001:db8:1:2::42")), 2);
    assert_eq!(ClientKey::of(ip("2001:db8:1:2:3:4:5:6")).to_string(), "2001:db8:1:2::/64");

    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: one client either way.
    let v4 = t.admit(ip("192.0.2.7"), 1);
    assert!(v4.is_some());
    assert!(t.admit(ip("::ffff:192.0.2.7"), 1).is_none());
    assert_eq!(ClientKey::of(ip("::ffff:192.0.2.7")).to_string(), "192.0.2.7");
    // ...and mapped addresses are not lumped together as one /64.
    assert!(t.admit(ip("::ffff:192.0.2.8"), 1).is_some());
}

#[test]
fn trusted_proxies_are_not_counted_and_zero_is_no_limit_but_still_counts() {
    let t = PerClient::new(vec![net("10.0.0.0/8"), net("fd00::/64")]);
    let lb: Vec<Option<ClientGuard>> = (0..100).map(|_| t.admit(ip("10.1.2.3"), 1)).collect();
    assert!(lb.iter().all(Option::is_some), "a trusted proxy is every client behind it");
    assert!(t.admit(ip("::ffff:10.1.2.3"), 1).is_some());
    assert!(t.admit(ip("fd00::1"), 1).is_some());
    assert_eq!(t.clients(), 0, "trusted proxies take no entries");

    // With no limit every connection is admitted and counted, so a reload that sets a
    // limit finds the connections already open.
    let open: Vec<Option<ClientGuard>> = (0..5).map(|_| t.admit(ip("192.0.2.1"), 0)).collect();
    assert!(open.iter().all(Option::is_some));
    assert_eq!(t.open(ip("192.0.2.1")), 5);
    assert!(t.admit(ip("192.0.2.1"), 5).is_none(), "a limit set later sees them");
    assert!(t.admit(ip("192.0.2.1"), 6).is_some());
}

#[test]
fn refusals_are_reported_at_once_then_at_most_every_ten_seconds_with_their_number() {
    let mut r = Throttle::default();
    let t0 = Instant::now();
    assert_eq!(r.note(t0), Some(1), "the first refusal is reported at once");
    for i in 1..=1000 {
        assert_eq!(r.note(t0 + Duration::from_millis(i)), None, "#{i}");
    }
    assert_eq!(r.note(t0 + Duration::from_millis(9_999)), None);
    assert_eq!(r.note(t0 + REPORT_EVERY), Some(1002), "every refusal since the last report");
    assert_eq!(r.note(t0 + REPORT_EVERY + Duration::from_secs(1)), None);
    assert_eq!(r.note(t0 + Duration::from_secs(60)), Some(2));
}
