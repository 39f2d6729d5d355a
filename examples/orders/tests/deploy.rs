//! The Kubernetes manifest of docs/deploy.md (`deploy/kubernetes/orders.yaml`)
//! says what it means: orders reads every setting it gives without a
//! problem, the probes name the chassis' endpoints on the bound port, and
//! the shutdown timings add up.

use std::time::Duration;

use chassis::config::{Config, Env, Reader};
use serde_json::Value;

fn manifest() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/kubernetes/orders.yaml"
    );
    let text = std::fs::read_to_string(path).expect("the manifest");
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn int(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("a number: {v}"))
}

#[test]
fn the_manifest_settings_are_read_by_orders_without_a_problem() {
    let docs = manifest();
    let deployment = of_kind(&docs, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // Values a Secret holds stand in as a cluster would give them.
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = match &e["value"] {
                Value::String(v) => v.clone(),
                _ => match e["valueFrom"]["secretKeyRef"]["key"].as_str() {
                    Some("database-url") => {
                        "postgres://orders:secret@postgres.shop.svc:5432/orders".to_owned()
                    }
                    Some(key) => format!("{key}-from-the-secret"),
                    None => panic!("{name}: a value or a secret"),
                },
            };
            (name, value)
        })
        .collect();
    let env = Env::from_pairs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut r = Reader::new(&env);
    let config = Config::read(&mut r);
    let settings = orders::Settings::read(&mut r);
    r.finish()
        .expect("orders reads the manifest's settings without a problem");

    // Every interface of the pod, on the container's port.
    assert!(config.bind.ip().is_unspecified(), "{}", config.bind);
    let port = int(&container["ports"][0]["containerPort"]);
    assert_eq!(u64::from(config.bind.port()), port);
    assert_eq!(settings.db.backend(), chassis::db::Backend::Postgres);
    // The scale-out setup publishes its events to JetStream.
    assert!(settings.nats.is_some(), "CHASSIS_NATS_URL is set");

    // Probes on the chassis' endpoints, by the port's name.
    for (probe, path) in [
        ("startupProbe", "/health/live"),
        ("livenessProbe", "/health/live"),
        ("readinessProbe", "/health/ready"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(
            container[probe]["httpGet"]["port"], container["ports"][0]["name"],
            "{probe}"
        );
    }

    // preStop sleeps as long as the chassis' own delay, and the pod's
    // grace covers the hook and the chassis' grace.
    let pre_stop = int(&container["lifecycle"]["preStop"]["sleep"]["seconds"]);
    assert_eq!(Duration::from_secs(pre_stop), config.shutdown_delay);
    let termination = int(&pod["terminationGracePeriodSeconds"]);
    assert!(
        Duration::from_secs(termination) > Duration::from_secs(pre_stop) + config.shutdown_grace,
        "terminationGracePeriodSeconds {termination} must exceed preStop {pre_stop} s + grace {:?}",
        config.shutdown_grace
    );
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
}

#[test]
fn a_headless_service_selects_the_pods_for_client_balancing() {
    let docs = manifest();
    let deployment = of_kind(&docs, "Deployment")[0];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let services = of_kind(&docs, "Service");
    let headless: Vec<_> = services
        .iter()
        .filter(|s| s["spec"]["clusterIP"] == "None")
        .collect();
    assert_eq!(headless.len(), 1);
    for service in services {
        let selector = service["spec"]["selector"].as_object().unwrap();
        for (k, v) in selector {
            assert_eq!(
                &labels[k], v,
                "{} selects the pods",
                service["metadata"]["name"]
            );
        }
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    }
    // The downstreams are reached through their own headless Services.
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let urls: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["name"].as_str().unwrap().ends_with("_URL")
                && e["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("CHASSIS_DOWNSTREAM_")
        })
        .map(|e| e["value"].as_str().unwrap())
        .collect();
    assert_eq!(urls.len(), 2);
    assert!(
        urls.iter()
            .all(|u| u.starts_with("dns+http://") && u.contains("-headless.")),
        "{urls:?}"
    );
}
