//! docs/METRICS.md lists every metric the catalogue declares.

#[test]
fn every_metric_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/METRICS.md"))
        .unwrap();
    for name in granary_core::metrics::ALL {
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} is missing from docs/METRICS.md"
        );
    }
    let declared = granary_core::metrics::ALL.len();
    let documented = doc.lines().filter(|l| l.starts_with("| `granary_")).count();
    assert_eq!(
        declared, documented,
        "docs/METRICS.md lists metrics the catalogue does not declare"
    );
}
