//! Validation as `surge check-config` reports it.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

#[test]
fn embedded_default_is_valid() {
    let cfg = parse(EMBEDDED_DEFAULT).expect("embedded default must validate");
    assert_eq!(
        cfg.proxy.listeners[0].listen,
        "127.0.0.1:8080".parse().unwrap()
    );
    assert!(cfg.local_blades.map_or(0, |l| l.count) >= 2);
}

#[test]
fn unknown_key_names_its_path_and_line() {
    let err = parse("[pool]\nname = \"x\"\n[pool.health]\nintervall = \"2s\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("test.toml:4"), "{err}");
    assert!(err.contains("pool.health"), "{err}");
    assert!(err.contains("unknown field `intervall`"), "{err}");
}

#[test]
fn bad_duration_names_the_key() {
    let err = parse(
        "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n[pool.health]\ninterval = \"2 parsecs\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("pool.health.interval"), "{err}");
}

#[test]
fn every_semantic_problem_is_listed() {
    let err = parse(
        r#"
        [proxy]
        listen = "nowhere"
        [pool]
        [[pool.backends]]
        address = "127.0.0.1:9001"
        [[pool.backends]]
        address = "127.0.0.1:9001"
        weight = 0
        "#,
    )
    .unwrap_err();
    let ConfigError::Invalid { problems, .. } = &err else {
        panic!("expected Invalid, got {err}");
    };
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "proxy.listen",
            "pool.backends[1].address",
            "pool.backends[1].weight"
        ]
    );
    assert_eq!(err.to_string().lines().count(), 3);
}

fn no_env() -> Environment {
    Environment {
        admin_token: None,
        cores: 2,
        read_file: |p| std::fs::read_to_string(p),
        hostname: "lb-test".into(),
        route_key: None,
        route_key_previous: None,
    }
}

#[test]
fn a_public_admin_address_needs_a_token() {
    let public =
        "[admin]\nlisten = \"0.0.0.0:9090\"\n[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n";
    let err = Config::parse_with(public, Path::new("test.toml"), &no_env())
        .unwrap_err()
        .to_string();
    assert!(err.contains("admin.token: required"), "{err}");
    let ok = parse_env("[admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"0123456789abcdef0123\"\n[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n");
    assert!(ok.is_ok());
    // The environment's token is enough, and wins over the file's.
    let env = Environment {
        admin_token: Some("from-the-environment-0123".into()),
        ..no_env()
    };
    let cfg = Config::parse_with(public, Path::new("test.toml"), &env).expect("token from env");
    assert_eq!(
        cfg.admin.token.as_deref(),
        Some("from-the-environment-0123")
    );
}

fn parse_env(text: &str) -> Result<Config, ConfigError> {
    Config::parse_with(text, Path::new("test.toml"), &no_env())
}

#[test]
fn workers_zero_means_one_per_core() {
    let cfg = parse_env("[proxy]\nworkers = 0\n[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n")
        .expect("valid");
    assert_eq!(cfg.proxy.workers, 2);
}

#[test]
fn every_problem_names_its_line_in_file_order() {
    let text = "[pool]\nname = \"my shop\"\n\n[pool.health]\nrise = 0\n\n[[pool.backends]]\naddress = \"127.0.0.1:1\"\nid = \"a b\"\n\n[proxy]\nmax_headers = 3\n";
    let err = parse_env(text).unwrap_err();
    let ConfigError::Invalid { problems, .. } = &err else {
        panic!("expected Invalid, got {err}");
    };
    let found: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.key.as_str())).collect();
    assert_eq!(
        found,
        [
            (2, "pool.name"),
            (5, "pool.health.rise"),
            (9, "pool.backends[0].id"),
            (12, "proxy.max_headers"),
        ]
    );
    let text = err.to_string();
    assert!(text.lines().next().is_some_and(|l| l.starts_with("test.toml:2: pool.name: `my shop` must be non-empty and use only letters, digits, - _ .")), "{text}");
    // A key that is not in the file (a default) has no line.
    let err = parse_env("[pool]\n").unwrap_err().to_string();
    assert!(
        err.starts_with("test.toml:1: pool.backends: no backends"),
        "{err}"
    );
}

#[test]
fn names_accept_what_the_message_says() {
    for good in ["shop", "Shop-2", "eu_west.1"] {
        assert!(is_valid_name(good), "{good}");
    }
    for bad in ["", "a b", "a/b", "a=b", "ü"] {
        assert!(!is_valid_name(bad), "{bad:?}");
    }
}

#[test]
fn scheduled_events_are_checked() {
    let base = "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n[provider]\nkind = \"scaleway\"\napi_url = \"sim\"\nzones = [\"fr-par-2\"]\noffer = \"EM-A115X-SSD\"\npublic_addresses = true\n[autoscale]\nmax = 10\n";
    let ok = format!("{base}[[autoscale.schedule]]\nname = \"bf\"\nat = \"2026-11-27T08:00:00+01:00\"\nduration = \"4h\"\nmin = 8\n[[autoscale.schedule]]\nname = \"fri\"\ncron = \"0 0 8 * * Fri\"\ntimezone = \"Europe/Paris\"\nduration = \"1h\"\nmin = 4\n");
    let cfg = parse(&ok).expect("valid schedule");
    assert_eq!(cfg.autoscale.map(|a| a.schedule.len()), Some(2));
    let bad = format!("{base}[[autoscale.schedule]]\nname = \"x\"\ncron = \"0 0 8 * * Fri\"\nduration = \"1h\"\nmin = 40\n");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("autoscale.schedule[0].timezone"), "{err}");
    assert!(
        err.contains("autoscale.schedule[0].min: 40 is above"),
        "{err}"
    );
}

#[test]
fn no_backends_is_refused() {
    let err = parse("[pool]\n").unwrap_err().to_string();
    assert!(err.contains("pool.backends: no backends"), "{err}");
}

#[test]
fn an_empty_admin_token_is_an_error_not_no_authentication() {
    let text = "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n";
    let env = Environment {
        admin_token: Some(String::new()),
        ..no_env()
    };
    let err = Config::parse_with(text, Path::new("test.toml"), &env)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin.token: SURGE_ADMIN_TOKEN is set but empty"),
        "{err}"
    );
    let err =
        parse_env("[admin]\ntoken = \"\"\n[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains("admin.token: is empty"), "{err}");
}

#[test]
fn a_cluster_section_names_endpoints_instance_and_lease() {
    let base = "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n";
    let good = format!("{base}[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nname = \"shop\"\n");
    match (cfg!(feature = "cluster"), parse_env(&good)) {
        (true, Ok(cfg)) => {
            let c = cfg.cluster.expect("a cluster");
            assert_eq!(c.instance, "lb-test", "the host name by default");
            assert_eq!(c.lease_ttl, std::time::Duration::from_secs(10));
            assert_eq!(c.name, "shop");
        }
        (false, Err(e)) => assert!(e.to_string().contains("--features cluster"), "{e}"),
        (built, other) => panic!("built with the cluster feature: {built}, yet {other:?}"),
    }
    let bad = format!(
        "{base}[cluster]\netcd = [\"127.0.0.1:2379\", \"http://h:99999\"]\ninstance = \"lb 1\"\nlease_ttl = \"500ms\"\n"
    );
    let err = parse_env(&bad).unwrap_err().to_string();
    for want in [
        "cluster.etcd[0]: `127.0.0.1:2379` is not an endpoint",
        "cluster.etcd[1]",
        "cluster.instance: must be non-empty",
        "cluster.lease_ttl: must be between 2s and 5m",
    ] {
        assert!(err.contains(want), "{want} missing from:\n{err}");
    }
    let none = format!("{base}[cluster]\netcd = []\n");
    let err = parse_env(&none).unwrap_err().to_string();
    assert!(err.contains("cluster.etcd: no endpoints"), "{err}");
    assert!(parse_env(base).unwrap().cluster.is_none(), "standalone");
}

#[test]
fn route_cookie_keys_are_long_and_shared_in_a_cluster() {
    let sticky =
        "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n[pool.sticky]\ncookie = \"cart\"\n";
    let standalone = parse_env(sticky).expect("a key file is made at start");
    let s = standalone.pool.sticky.expect("sticky");
    assert!(s.route_key.is_none());
    assert_eq!(s.route_key_file, std::path::Path::new("data/route.key"));
    let short = Environment {
        route_key: Some("too-short".into()),
        ..no_env()
    };
    let err = Config::parse_with(sticky, Path::new("test.toml"), &short)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pool.sticky.route_key_file: SURGE_ROUTE_KEY is shorter than 32 bytes"),
        "{err}"
    );
    let clustered = format!("{sticky}[cluster]\netcd = [\"http://127.0.0.1:2379\"]\n");
    let err = parse_env(&clustered).unwrap_err().to_string();
    assert!(
        err.contains("every instance must sign route cookies with one key")
            && err.contains("SURGE_ROUTE_KEY"),
        "{err}"
    );
    let keyed = Environment {
        route_key: Some("0123456789abcdef0123456789abcdef".into()),
        ..no_env()
    };
    let outcome = Config::parse_with(&clustered, Path::new("test.toml"), &keyed);
    assert_eq!(outcome.is_ok(), cfg!(feature = "cluster"), "{outcome:?}");
}

#[test]
fn trusted_proxies_are_addresses_or_cidr_blocks() {
    let base = "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n";
    let ok = parse_env(&format!(
        "[proxy]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n{base}"
    ))
    .unwrap();
    let nets = &ok.proxy.trusted_proxies;
    assert_eq!(nets.len(), 3);
    assert!(nets[0].contains(&"10.9.8.7".parse::<std::net::IpAddr>().unwrap()));
    assert!(nets[1].contains(&"192.0.2.7".parse::<std::net::IpAddr>().unwrap()));
    assert!(!nets[1].contains(&"192.0.2.8".parse::<std::net::IpAddr>().unwrap()));
    let err = parse_env(&format!(
        "[proxy]\ntrusted_proxies = [\"cdn.example\"]\n{base}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("proxy.trusted_proxies[0]: `cdn.example` is not an address or a CIDR block"),
        "{err}"
    );
}

#[test]
fn a_proxy_protocol_listener_needs_trusted_balancers() {
    let base = "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n";
    let listener = "[[listeners]]\nlisten = \"127.0.0.1:8443\"\nproxy_protocol = true\n";
    let err = parse_env(&format!("{listener}{base}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listeners[0].proxy_protocol: needs proxy.trusted_proxies"),
        "{err}"
    );
    let ok = parse_env(&format!(
        "[proxy]\ntrusted_proxies = [\"10.0.0.0/8\"]\n{listener}{base}"
    ))
    .unwrap();
    assert!(ok.proxy.listeners[0].proxy_protocol);
}

#[test]
fn a_maas_provider_takes_constraints_and_refuses_what_maas_lacks() {
    let tail = "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n";
    let ok = parse_env(&format!(
        "[provider]\nkind = \"maas\"\napi_url = \"https://maas.example/MAAS\"\nzones = [\"room-a\"]\napi_key_env = \"SHOP_MAAS_KEY\"\n[provider.maas]\nresource_pool = \"frontends\"\ntags = [\"blade\"]\n{tail}"
    ))
    .unwrap();
    let p = ok.provider.as_ref().unwrap();
    assert_eq!(p.secret_key_env, "SHOP_MAAS_KEY");
    assert_eq!(p.offer, "frontends", "the resource pool is the offer");
    assert_eq!(p.maas.as_ref().unwrap().distro_series, "noble");
    let default_env = parse_env(&format!(
        "[provider]\nkind = \"maas\"\napi_url = \"sim\"\nzones = [\"room-a\"]\n{tail}"
    ))
    .unwrap();
    let p = default_env.provider.as_ref().unwrap();
    assert_eq!(p.secret_key_env, "MAAS_API_KEY");
    assert_eq!(p.offer, "ready-machines");
    let err = parse_env(&format!(
        "[provider]\nkind = \"maas\"\napi_url = \"sim\"\nzones = [\"a\"]\noffer = \"EM-A115X-SSD\"\nprivate_network = \"pn\"\n{tail}"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("provider.offer: MAAS sells nothing"), "{err}");
    assert!(
        err.contains("provider.private_network: MAAS machines are reached"),
        "{err}"
    );
    let err = parse_env(&format!(
        "[provider]\nkind = \"scaleway\"\napi_url = \"sim\"\nzones = [\"a\"]\noffer = \"o\"\npublic_addresses = true\n[provider.maas]\ntags = []\n{tail}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("provider.maas: only with kind = \"maas\""),
        "{err}"
    );
}

#[test]
fn a_waiting_room_needs_shedding_and_sane_times() {
    let tail = "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n";
    let err = parse_env(&format!("[waiting_room]\nrefresh = \"5s\"\n{tail}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("waiting_room: needs [pool.shed]"), "{err}");
    let ok = parse_env(&format!(
        "[waiting_room]\nheld = true\n{tail}[pool.shed]\nmax_in_flight_per_node = 10\n"
    ))
    .unwrap();
    let w = ok.pool.waiting_room.as_ref().unwrap();
    assert!(w.held);
    assert_eq!(w.cookie, "surge_queue");
    let err = parse_env(&format!(
        "[waiting_room]\nrefresh = \"10s\"\nabandon_after = \"5s\"\n{tail}[pool.shed]\nmax_in_flight_per_node = 10\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("waiting_room.abandon_after"), "{err}");
    let off = parse_env(&format!("[waiting_room]\nenabled = false\n{tail}")).unwrap();
    assert!(off.pool.waiting_room.is_none());
}
