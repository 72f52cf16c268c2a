//! Deliberate misbehaviour of the simulator, vendor-neutral: which request is slowed,
//! rate-limited or failed, which order is doomed or has its answer "lost". Each vendor
//! API ([`super::elastic_metal`]) words the fault the way its vendor would.

use std::time::Duration;

use serde::Deserialize;

/// Deliberate misbehaviour. Also the body of `PUT /sim/v1/faults` (JSON, every field
/// optional, durations like `"2s"`), which switches chaos on and off at run time.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of orders (0..=1) that end in status `error` instead of `ready`.
    pub order_error_share: f64,
    /// Offer names reported with stock `empty`; ordering them fails with `out_of_stock`.
    pub out_of_stock: Vec<String>,
    /// Answer every Nth request with 429 (0: never).
    pub rate_limit_every: u64,
    /// `Retry-After` seconds on those 429s.
    pub retry_after_secs: u64,
    /// Share of requests (0..=1) answered with 503 before doing anything.
    pub server_error_share: f64,
    /// Added delay on every answer.
    #[serde(with = "humantime_serde")]
    pub slow: Duration,
    /// The next this-many orders are created but answered only after `lost_delay`, as if
    /// the answer were lost in the network.
    pub lose_orders: u64,
    #[serde(with = "humantime_serde")]
    pub lost_delay: Duration,
    /// The next this-many orders are created, then answered with a 500 (a vendor's
    /// gateway failing behind an order it took).
    pub create_then_5xx: u64,
    /// The next this-many server listings answer as if there were no servers at all
    /// (`servers: []`, `total_count: 0`): a wrong project id, a vendor hiccup.
    pub empty_listings: u64,
    /// The next this-many listings skip their first page (its servers are missing, the
    /// total still counts them), as when the list changes between pages.
    pub skip_pages: u64,
    /// Servers younger than this are missing from listings (a `GET` by id finds them):
    /// an eventually consistent list that lags its creates.
    #[serde(with = "humantime_serde")]
    pub hide_new_for: Duration,
}

/// A fault asked for on one request with `?sim_fault=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneOff {
    /// `429`: rate-limit this request.
    RateLimit,
    /// `500`: an outage for this request.
    Outage,
    /// `slow`: answer it late.
    Slow,
    /// `lose`: create the order but answer late.
    Lose,
}

impl OneOff {
    /// The fault named by a `sim_fault` query value.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "429" => Some(OneOff::RateLimit),
            "500" => Some(OneOff::Outage),
            "slow" => Some(OneOff::Slow),
            "lose" => Some(OneOff::Lose),
            _ => None,
        }
    }
}

/// Delay of an answer when none is configured but one is asked for.
const DEFAULT_SLOW: Duration = Duration::from_secs(2);

/// Delay of a lost order's answer when none is configured.
const DEFAULT_LOST_DELAY: Duration = Duration::from_secs(5);

impl Faults {
    /// How long to hold a request before answering it, if at all.
    pub fn delay(&self, one_off: Option<OneOff>) -> Option<Duration> {
        if !self.slow.is_zero() {
            Some(self.slow)
        } else {
            (one_off == Some(OneOff::Slow)).then_some(DEFAULT_SLOW)
        }
    }

    /// `Retry-After` seconds if request number `n` (from 1) is to be rate-limited.
    pub fn rate_limit(&self, n: u64, one_off: Option<OneOff>) -> Option<u64> {
        let every = self.rate_limit_every > 0 && n % self.rate_limit_every == 0;
        (every || one_off == Some(OneOff::RateLimit)).then(|| self.retry_after_secs.max(1))
    }

    /// Whether this request meets an outage (`roll`: a uniform sample in 0..1).
    pub fn outage(&self, one_off: Option<OneOff>, roll: f64) -> bool {
        one_off == Some(OneOff::Outage)
            || (self.server_error_share > 0.0 && roll < self.server_error_share)
    }

    /// Whether a new order is doomed to end in error (`roll`: uniform in 0..1).
    pub fn doomed(&self, roll: f64) -> bool {
        self.order_error_share > 0.0 && roll < self.order_error_share
    }

    /// How late a lost order's answer comes.
    pub fn lost_delay(&self) -> Duration {
        if self.lost_delay.is_zero() {
            DEFAULT_LOST_DELAY
        } else {
            self.lost_delay
        }
    }

    /// Whether `offer_name` is reported out of stock.
    pub fn sold_out(&self, offer_name: &str) -> bool {
        self.out_of_stock.iter().any(|o| o == offer_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_request_is_rate_limited_and_one_offs_apply_once() {
        let f = Faults {
            rate_limit_every: 3,
            retry_after_secs: 0,
            ..Faults::default()
        };
        let limited: Vec<u64> = (1..=9)
            .filter(|&n| f.rate_limit(n, None).is_some())
            .collect();
        assert_eq!(limited, [3, 6, 9]);
        assert_eq!(
            f.rate_limit(3, None),
            Some(1),
            "Retry-After is at least 1 s"
        );
        let calm = Faults::default();
        assert_eq!(calm.rate_limit(1, Some(OneOff::RateLimit)), Some(1));
        assert!(calm.outage(Some(OneOff::Outage), 0.99));
        assert!(!calm.outage(None, 0.0));
        assert_eq!(calm.delay(Some(OneOff::Slow)), Some(DEFAULT_SLOW));
        assert_eq!(calm.delay(None), None);
        assert_eq!(OneOff::parse("lose"), Some(OneOff::Lose));
        assert_eq!(OneOff::parse("nope"), None);
    }
}
