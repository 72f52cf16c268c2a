//! From delivered server to serving frontend, end to end with the real client against
//! the simulator: the order carries the rendered user-data and the SSH keys, blades are
//! reached on their private address, a bootstrap that never gets healthy is released
//! and replaced until three in a row stop the orders, a fixed bootstrap resumes them, and
//! a slow one joins without being ordered twice.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::scaling::*;
use common::*;
use surge::pool::State;
use surge::sim::Faults;

/// A user-data file of its own for one test.
fn user_data(text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "surge-boot-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("user-data.yaml");
    std::fs::write(&file, text).unwrap();
    file
}

/// `[autoscale]` keys, then the bootstrap table (TOML allows it after other tables).
fn extra(autoscale: &str, file: &std::path::Path) -> String {
    format!(
        "{autoscale}\n[provider.bootstrap]\nuser_data = \"{}\"\nssh_key_ids = [\"key-ops-1\", \"key-ops-2\"]\n",
        file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_carries_the_rendered_user_data_and_the_blade_serves_on_its_private_address() {
    let rig = own_sim("SURGE_TEST_SCW_KEY_RENDER", Faults::default()).await;
    let (sim, port) = (&rig.sim, rig.port);
    let file = user_data(
        "#cloud-config\nhostname: {{server_name}}\n# pool {{pool}} in {{zone}}, proxy {{proxy_address}}, port {{blade_port}}\n",
    );
    let cfg = rig.config(&extra("min = 2\nmax = 4\n", &file));
    let surge = surge::serve::start(&cfg).await.unwrap();
    let served = eventually(Duration::from_secs(10), || in_service(&surge) == 2).await;
    assert!(served, "{:#?}", status_of(&surge));
    let ids = sim.server_ids();
    assert_eq!(ids.len(), 1);
    let ordered = sim.ordered_with(&ids[0]).unwrap();
    let ud = ordered.user_data.clone().unwrap_or_default();
    assert!(
        ud.starts_with("#cloud-config\nhostname: surge-shop-"),
        "{ud}"
    );
    assert!(!ud.contains("{{"), "not rendered: {ud}");
    assert!(
        ud.contains(&format!(
            "pool shop in fr-par-2, proxy {}, port {port}",
            cfg.proxy.listeners[0].listen
        )),
        "{ud}"
    );
    assert_eq!(ordered.ssh_key_ids, ["key-ops-1", "key-ops-2"]);
    assert_eq!(ordered.private_network.as_deref(), Some("pn-test"));
    // The pool reaches it on its private address, where its frontend listens.
    let private = ordered.private_ip.expect("a private address");
    let node = surge
        .pool
        .snapshot()
        .members()
        .iter()
        .find(|m| m.backend.origin == surge::pool::Origin::Provisioned)
        .map(|m| (m.backend.addr, m.state));
    assert_eq!(
        node,
        Some((
            std::net::SocketAddr::new(private.into(), port),
            State::InService
        ))
    );
    surge.stop().await;
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_bootstrap_is_released_and_replaced_until_three_in_a_row_stop_orders() {
    let rig = own_sim("SURGE_TEST_SCW_KEY_BROKEN", Faults::default()).await;
    let sim = &rig.sim;
    let broken = user_data("#!/bin/sh\n#surge-sim never-healthy\nexit 1\n");
    let auto = "min = 2\nmax = 4\nbootstrap_timeout = \"1500ms\"\nbootstrap_failures = 3\n";
    let cfg = rig.config(&extra(auto, &broken));
    let surge = surge::serve::start(&cfg).await.unwrap();
    let alarmed = eventually(Duration::from_secs(20), || {
        status_of(&surge).bootstrap_alarm.is_some()
    })
    .await;
    let status = status_of(&surge);
    assert!(alarmed, "{status:#?}");
    let alarm = status.bootstrap_alarm.clone().unwrap_or_default();
    assert!(
        alarm.contains("bootstrap is failing") && alarm.contains("3 delivered servers"),
        "{alarm}"
    );
    assert!(
        alarm.contains("connect failed") || alarm.contains("no health check"),
        "names the last error: {alarm}"
    );
    // Every failed server was released (not billed forever), and no more are ordered.
    let released = eventually(Duration::from_secs(3), || sim.server_count() == 0).await;
    assert!(released, "{} servers left", sim.server_count());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sim.server_count(), 0, "ordered again after the alarm");
    assert_eq!(in_service(&surge), 1, "the static blade serves on");
    surge.stop().await;

    // The operator fixes the user-data and reloads: ordering resumes and the server
    // serves.
    let fixed = user_data("#cloud-config\n# a working install\n");
    let cfg = rig.config(&extra(auto, &fixed));
    let surge = surge::serve::start(&cfg).await.unwrap();
    let served = eventually(Duration::from_secs(10), || in_service(&surge) == 2).await;
    assert!(served, "{:#?}", status_of(&surge));
    assert!(status_of(&surge).bootstrap_alarm.is_none());
    surge.stop().await;
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_bootstrap_joins_without_being_ordered_twice() {
    let rig = own_sim("SURGE_TEST_SCW_KEY_SLOW", Faults::default()).await;
    let sim = &rig.sim;
    let slow = user_data("#cloud-config\n#surge-sim healthy-after 3s\n");
    let auto = "min = 2\nmax = 4\nbootstrap_timeout = \"10s\"\n";
    let cfg = rig.config(&extra(auto, &slow));
    let surge = surge::serve::start(&cfg).await.unwrap();
    let mut most = 0;
    let served = eventually(Duration::from_secs(12), || {
        most = most.max(sim.server_count());
        in_service(&surge) == 2
    })
    .await;
    assert!(served, "{:#?}", status_of(&surge));
    assert_eq!(most, 1, "ordered again while the first one booted");
    assert_eq!(sim.server_count(), 1);
    assert!(status_of(&surge).bootstrap_alarm.is_none());
    surge.stop().await;
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blades_off_a_private_network_are_reached_over_verified_tls() {
    let (ca_pem, blade_tls) = blade_pki();
    let blade = surge::blade::start(surge::blade::BladeConfig {
        id: "tls-blade".into(),
        listen: ([127, 0, 0, 1], 0).into(),
        latency: Duration::from_millis(1),
        cpu_work: 0,
        tls: Some(blade_tls),
    })
    .await
    .unwrap();
    let ca = user_data(&ca_pem);
    let (other_ca, _) = blade_pki();
    let wrong = user_data(&other_ca);
    for (ca, trusted) in [(&ca, true), (&wrong, false)] {
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 1\naccess_log = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[pool]\nslow_start = \"0s\"\n[pool.health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n[pool.tls]\nca = \"{}\"\n[[pool.backends]]\nid = \"tls-blade\"\naddress = \"{}\"\n",
            ca.display(),
            blade.addr
        );
        let cfg =
            surge::config::Config::parse(&text, std::path::Path::new("tls-blade.toml")).unwrap();
        let surge = surge::serve::start(&cfg).await.unwrap();
        let c = client();
        if trusted {
            // Health checks over TLS keep it in service; requests reach it.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let r = get(&c, surge.proxy.local_addr, "/catalog").await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.blade(), "tls-blade");
            assert_eq!(
                surge.pool.snapshot().get("tls-blade").map(|m| m.state),
                Some(State::InService)
            );
        } else {
            // A blade whose certificate the configured CA did not sign is never trusted.
            let down = eventually(Duration::from_secs(3), || {
                surge.pool.snapshot().get("tls-blade").map(|m| m.state) == Some(State::Down)
            })
            .await;
            assert!(
                down,
                "a blade with an unverifiable certificate stayed in service"
            );
            let r = get(&c, surge.proxy.local_addr, "/catalog").await.unwrap();
            assert_ne!(r.status, 200);
        }
        surge.stop().await;
    }
}
