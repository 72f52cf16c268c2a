//! The autoscaler's demand signal, written by the proxy: new connections that delivered a
//! complete first request (after TLS on TLS listeners). A connection that sends nothing,
//! fails its handshake or is refused never counts, and one client address (IPv6: its /64,
//! what one subscriber gets) counts for at most a share of the rate, so no single client
//! can run up the shop's bill by opening connections.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pingora_limits::rate::Rate;

/// A client's first requests per second that always count, whatever the share: at low
/// traffic one shopper is a large share of it.
const ALWAYS_COUNTED_PER_CLIENT: f64 = 2.0;

/// Key of the total in the rate sketch (no client address hashes to a string).
const TOTAL: &str = "surge-total";

/// Connections counted for scaling, and how much one client may count.
pub struct ScalingSignal {
    /// Connections counted for scaling (cumulative; the meter turns it into a rate).
    pub counted: AtomicU64,
    /// Connections not counted: their client was over its share.
    pub discounted: AtomicU64,
    /// Most of the rate one client may make (0..=1), as `f64` bits; 1 = no cap.
    share: AtomicU64,
    /// First requests per client and in total, per second.
    rates: Rate,
}

impl std::fmt::Debug for ScalingSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScalingSignal")
            .field("counted", &self.counted.load(Ordering::Relaxed))
            .field("discounted", &self.discounted.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for ScalingSignal {
    fn default() -> Self {
        Self {
            counted: AtomicU64::new(0),
            discounted: AtomicU64::new(0),
            share: AtomicU64::new(1f64.to_bits()),
            rates: Rate::new(Duration::from_secs(1)),
        }
    }
}

/// The address a client is counted under: IPv4 as is, IPv6 by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

/// Whether a client's `count`-th first request this second counts, when the whole pool
/// saw `total_last_second` last second and a client may make `share` of it.
pub fn within_share(count: f64, total_last_second: f64, share: f64) -> bool {
    share >= 1.0 || count <= (share * total_last_second).max(ALWAYS_COUNTED_PER_CLIENT)
}

impl ScalingSignal {
    /// Sets the share of the rate one client may make (`autoscale.max_client_share`).
    pub fn set_share(&self, share: f64) {
        self.share
            .store(share.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// A connection from `ip` delivered its first complete request: counts it, unless
    /// its client is over its share. Returns whether it counted.
    pub fn first_request(&self, ip: IpAddr) -> bool {
        let share = f64::from_bits(self.share.load(Ordering::Relaxed));
        let counts = share >= 1.0 || {
            let total = self.rates.rate(&TOTAL);
            self.rates.observe(&TOTAL, 1);
            let mine = self.rates.observe(&client_key(ip), 1);
            within_share(mine as f64, total, share)
        };
        if counts {
            self.counted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.discounted.fetch_add(1, Ordering::Relaxed);
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), v4);
    }

    #[test]
    fn one_client_counts_for_at_most_its_share() {
        // 1,000 first requests/s pool-wide last second, 10% each: 100 count.
        assert!(within_share(100.0, 1000.0, 0.1));
        assert!(!within_share(101.0, 1000.0, 0.1));
        // A lone shopper at night still counts a couple per second.
        assert!(within_share(2.0, 3.0, 0.1));
        assert!(!within_share(3.0, 3.0, 0.1));
        assert!(within_share(1e9, 0.0, 1.0), "share 1: no cap");
    }

    #[test]
    fn a_flooding_client_stops_counting_while_others_do() {
        let s = ScalingSignal::default();
        s.set_share(0.1);
        let flood: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..500 {
            s.first_request(flood);
        }
        assert!(
            s.counted.load(Ordering::Relaxed) <= 2,
            "first second: the floor only"
        );
        assert!(
            s.first_request("192.0.2.2".parse().unwrap()),
            "another shopper counts"
        );
    }
}
