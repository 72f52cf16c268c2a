//! surge: an autoscaling L7 load balancer for e-commerce frontends.
//!
//! Module floors (a module imports only from floors below its own, never across its own
//! floor; docs/architecture.md is the map and says what each room owns), top to bottom:
//! 1. `serve`: the wiring `main` calls;
//! 2. `admin`;
//! 3. `autoscale`, `proxy`;
//! 4. `pool`, `provider`, `sim`, `cluster`;
//! 5. `telemetry`, `blade`, `loadtest`, `handoff`;
//! 6. `config`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod autoscale;
pub mod blade;
pub mod cluster;
pub mod config;
pub mod handoff;
pub mod loadtest;
pub mod pool;
pub mod provider;
pub mod proxy;
pub mod serve;
pub mod sim;
pub mod telemetry;
