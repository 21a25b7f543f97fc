//! The Kubernetes manifests in `node/deploy/kubernetes/`: valid against the API's schemas
//! (`kubernetes-validate --strict`, offline; without it the test says so loudly and skips
//! that part), their ConfigMaps' TOML accepted by tenure's own config loader, and the
//! exporter granted no more than it needs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context};
use serde::Deserialize;
use serde_yaml::Value;
use tenure_node::config::{self, CollectorConfig, ExporterConfig, IdentityConfig};

const FILES: [&str; 4] = [
    "namespace.yaml",
    "secret.yaml",
    "exporter.yaml",
    "collector.yaml",
];
/// The API version the manifests are checked against (k8s-openapi's, `node/Cargo.toml`).
const KUBERNETES_VERSION: &str = "1.32.0";

fn loudly(line: &str) {
    let line = format!("{line}\n");
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/tty")
        .and_then(|mut tty| tty.write_all(line.as_bytes()));
    eprint!("{line}");
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// Every object of every manifest.
fn objects() -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for file in FILES {
        let path = dir().join(file);
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).with_context(|| path.display().to_string())?;
            if !value.is_null() {
                out.push(value);
            }
        }
    }
    Ok(out)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .with_context(|| format!("no {kind} {name}"))
}

fn validate(files: &[PathBuf]) -> anyhow::Result<(bool, String)> {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(files)
        .output()
        .context("kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn manifests_validate_against_the_api_schemas() -> anyhow::Result<()> {
    if Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_err()
    {
        loudly("SKIPPED (kubernetes-validate not installed: pip install kubernetes-validate): schema validation of node/deploy/kubernetes/*.yaml");
        return Ok(());
    }
    let files: Vec<PathBuf> = FILES.iter().map(|f| dir().join(f)).collect();
    let (ok, text) = validate(&files)?;
    ensure!(ok, "kubernetes-validate failed:\n{text}");
    ensure!(!text.contains("ERROR") && !text.contains("WARN"), "{text}");
    // The validator catches a mistake: a DaemonSet with a field the API does not have.
    let broken = tempfile::tempdir()?;
    let text = std::fs::read_to_string(dir().join("exporter.yaml"))?;
    let path = broken.path().join("exporter.yaml");
    std::fs::write(
        &path,
        text.replace(
            "hostNetwork: true",
            "hostNetwork: true\n      hostNetworks: true",
        ),
    )?;
    let (ok, text) = validate(&[path])?;
    ensure!(!ok, "a misspelt field passed:\n{text}");
    Ok(())
}

fn config_map_toml(objects: &[Value], name: &str, key: &str) -> anyhow::Result<String> {
    find(objects, "ConfigMap", name)?["data"][key]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("ConfigMap {name} without {key}"))
}

#[test]
fn config_maps_hold_configs_tenure_accepts() -> anyhow::Result<()> {
    let objects = objects()?;
    let text = config_map_toml(&objects, "tenure-exporter", "exporter.toml")?;
    let mut exporter: ExporterConfig = config::parse(&text, Path::new("exporter.toml"))?;
    // What the DaemonSet's command sets per node.
    exporter.collectors = vec!["10.96.0.10:7947".parse()?];
    exporter.validate(false)?;
    let IdentityConfig::Kubernetes {
        node_name,
        api_server,
        ..
    } = exporter.identity.as_ref().context("identity")?
    else {
        anyhow::bail!("the exporter's identity is not kind = \"kubernetes\"");
    };
    ensure!(
        node_name.is_none() && api_server.is_none(),
        "NODE_NAME and in-cluster config"
    );
    let text = config_map_toml(&objects, "tenure-collector", "collector.toml")?;
    let collector: CollectorConfig = config::parse(&text, Path::new("collector.toml"))?;
    collector.validate()?;
    ensure!(collector.region == exporter.region, "one region");
    // Prometheus scrapes the ports the configs serve on.
    let daemonset = find(&objects, "DaemonSet", "tenure-exporter")?;
    let port =
        daemonset["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"].as_str();
    ensure!(
        port == exporter.http_addr.map(|a| a.port().to_string()).as_deref(),
        "exporter scrape port {port:?}"
    );
    let statefulset = find(&objects, "StatefulSet", "tenure-collector")?;
    let port =
        statefulset["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"].as_str();
    ensure!(
        port == Some(collector.http_addr.port().to_string()).as_deref(),
        "collector scrape port {port:?}"
    );
    Ok(())
}

#[test]
fn the_exporter_gets_only_what_it_needs() -> anyhow::Result<()> {
    let objects = objects()?;
    let role = find(&objects, "ClusterRole", "tenure-exporter")?;
    let rules = role["rules"].as_sequence().context("rules")?;
    ensure!(rules.len() == 1, "one rule: {rules:?}");
    let rule = &rules[0];
    let strings = |v: &Value| -> Vec<String> {
        v.as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    ensure!(strings(&rule["apiGroups"]) == [""], "core group only");
    ensure!(strings(&rule["resources"]) == ["pods"], "pods only");
    ensure!(
        strings(&rule["verbs"]) == ["get", "list", "watch"],
        "read only"
    );
    let pod = &find(&objects, "DaemonSet", "tenure-exporter")?["spec"]["template"]["spec"];
    ensure!(pod["hostNetwork"].as_bool() == Some(true), "hostNetwork");
    let container = &pod["containers"][0];
    let caps = &container["securityContext"]["capabilities"];
    ensure!(strings(&caps["drop"]) == ["ALL"], "drops all");
    ensure!(
        strings(&caps["add"]) == ["BPF", "PERFMON"],
        "adds BPF and PERFMON only"
    );
    ensure!(container["securityContext"]["allowPrivilegeEscalation"].as_bool() == Some(false));
    ensure!(
        container["securityContext"].get("privileged").is_none(),
        "not privileged"
    );
    let env = container["env"].as_sequence().context("env")?;
    let node_name = env
        .iter()
        .find(|e| e["name"].as_str() == Some("NODE_NAME"))
        .context("NODE_NAME")?;
    ensure!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("spec.nodeName"),
        "downward API"
    );
    // The collectors' headless Service names them before they are ready.
    let headless = find(&objects, "Service", "tenure-collector")?;
    ensure!(headless["spec"]["clusterIP"].as_str() == Some("None"));
    ensure!(headless["spec"]["publishNotReadyAddresses"].as_bool() == Some(true));
    ensure!(
        find(&objects, "StatefulSet", "tenure-collector")?["spec"]["serviceName"].as_str()
            == Some("tenure-collector")
    );
    Ok(())
}
