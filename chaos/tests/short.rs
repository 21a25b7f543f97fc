//! The short scenario against real `tenure collector` processes: `kill -9` of a node under
//! load and its restart on the same data directory, a partition, a pause. No acknowledged
//! flow may be lost and none misattributed.

mod common;

use tenure_chaos::{run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_scenario_loses_and_misattributes_nothing() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tenure-chaos-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = Options {
        tenure_bin: common::tenure_bin()?,
        dir: dir.clone(),
        seed: 7,
        duration_secs: 0,
        regions: 2,
        nodes_per_region: 3,
        exporters_per_region: 6,
        namespaces: true,
    };
    let report = run(&options).await?;
    println!("{report}");
    assert!(report.faults >= 2, "faults injected: {report}");
    assert!(report.acked > 100, "traffic flowed: {report}");
    assert_eq!(report.lost, 0, "acknowledged flows lost: {report}");
    assert_eq!(report.misattributed, 0, "misattributed flows: {report}");
    assert_eq!(
        report.phantom, 0,
        "flows emitted that were never sent: {report}"
    );
    assert!(report.passed(), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
