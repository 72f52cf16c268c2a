//! surge: an autoscaling L7 load balancer for e-commerce frontends.
//!
//! Module floors (a module imports only from floors below its own; see DESIGN.md):
//! `serve`, `handoff` (the wiring `main` calls); `admin`; `autoscale`, `proxy`; `provider`, `pool`, `sim`;
//! `telemetry`, `blade`; `config`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod autoscale;
pub mod blade;
pub mod config;
pub mod handoff;
pub mod loadtest;
pub mod pool;
pub mod provider;
pub mod proxy;
pub mod serve;
pub mod sim;
pub mod telemetry;
