use super::*;

fn parse(text: &str) -> Result<Settings, ConfigError> {
    toml::from_str::<ConfigFile>(text)
        .map_err(|e| ConfigError::Parse {
            path: "t.toml".into(),
            message: e.to_string(),
        })?
        .settings()
}

#[test]
fn full_config() {
    let s = parse(
        r#"
        node_id = "n1"
        listen = "127.0.0.1:7000"
        metadata_ttl = "5s"
        [cache]
        dir = "/tmp/c"
        memory = "64MiB"
        disk = "1GiB"
        block_size = "1MiB"
        [backend]
        max_concurrency = 8
        [datasets]
        load_concurrency = 16
        load_threads = 2
        [[mount]]
        path = "/a"
        source = "s3://bucket/x"
        [[mount]]
        path = "/g"
        source = "file:///mnt/g"
        "#,
    )
    .unwrap();
    assert_eq!(s.node_id, "n1");
    assert_eq!(s.cache.block_size.get(), 1 << 20);
    assert_eq!(s.metadata_ttl, Duration::from_secs(5));
    assert_eq!(s.namespace.mounts().len(), 2);
    assert_eq!(s.backend.max_concurrency, 8);
    assert_eq!(s.datasets.load_concurrency, 16);
    assert_eq!(s.datasets.load_threads, 2);
}

#[test]
fn tokens_come_from_files_env_or_inline() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin");
    std::fs::write(&admin, "admin-from-a-file-0123\n").unwrap();
    let hook = dir.path().join("scheduler");
    std::fs::write(&hook, "scheduler-from-a-file-0123").unwrap();
    // Cargo sets this one for the test binary (its value: the package's name).
    let var = "CARGO_PKG_NAME";
    let s = parse(&format!(
        "[datasets]\nadmin_token_file = {admin:?}\nscheduler_token_file = {hook:?}\n\
         [[tenant]]\nname = \"a\"\ntoken_env = \"{var}\"\nquota_files = 10\n\
         [[tenant]]\nname = \"b\"\ntoken = \"inline-token-0123456\"\n\
         [[mount]]\npath = \"/a\"\nsource = \"s3://bucket\"\n"
    ))
    .unwrap();
    let d = &s.datasets;
    assert_eq!(d.admin_token, Some(Token::new("admin-from-a-file-0123")));
    assert_eq!(
        d.scheduler_token,
        Some(Token::new("scheduler-from-a-file-0123"))
    );
    assert_eq!(d.tenants[0].token, Token::new(env!("CARGO_PKG_NAME")));
    assert_eq!(d.tenants[0].quota_files, Some(10));
    assert_eq!(d.tenants[1].token, Token::new("inline-token-0123456"));
    assert!(!d.open());
}

#[test]
fn bad_configs_name_the_problem() {
    let mount = "[[mount]]\npath = \"/a\"\nsource = \"s3://bucket\"\n";
    let cases = [
        (format!("bogus = 1\n{mount}"), "unknown field"),
        ("".to_string(), "no [[mount]]"),
        (
            format!("[cache]\nmemory = \"lots\"\n{mount}"),
            "cache.memory",
        ),
        (
            format!("[cache]\nblock_size = \"3MiB\"\n{mount}"),
            "cache.block_size",
        ),
        (format!("[cache]\ndisk = \"1MiB\"\n{mount}"), "disk cache"),
        (format!("listen = \"nowhere\"\n{mount}"), "listen"),
        (
            "[[mount]]\npath = \"/a\"\nsource = \"gs://x\"\n".to_string(),
            "unknown URI scheme",
        ),
        (
            format!("{mount}[[mount]]\npath = \"/a/b\"\nsource = \"s3://other\"\n"),
            "overlap",
        ),
        (format!("node_id = \"a b\"\n{mount}"), "node_id"),
        (
            format!("[datasets]\nadmin_token = \"short\"\n{mount}"),
            "at least 16",
        ),
        (
            format!("[datasets]\ncapacity = \"huge\"\n{mount}"),
            "datasets.capacity",
        ),
        (
            format!("[datasets]\nload_concurrency = 0\n{mount}"),
            "load_concurrency",
        ),
        (
            format!("[datasets]\nload_threads = 0\n{mount}"),
            "datasets.load_threads must be 1-64",
        ),
        (
            format!(
                "[[tenant]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\n\
                 [[tenant]]\nname = \"b\"\ntoken = \"0123456789abcdef\"\n{mount}"
            ),
            "unique",
        ),
        (
            format!("[[tenant]]\nname = \"Bad\"\ntoken = \"0123456789abcdef\"\n{mount}"),
            "tenant name",
        ),
        (
            format!(
                "[[tenant]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\nquota = \"x\"\n{mount}"
            ),
            "quota",
        ),
    ];
    for (text, needle) in cases {
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn bad_token_configs_name_the_problem() {
    let mount = "[[mount]]\npath = \"/a\"\nsource = \"s3://bucket\"\n";
    let cases = [
        (
            format!("[datasets]\nadmin_token_file = \"/no/such/secret\"\n{mount}"),
            "datasets.admin_token_file: cannot read /no/such/secret",
        ),
        (
            format!("[datasets]\nscheduler_token_env = \"GRANARY_TEST_UNSET_VARIABLE\"\n{mount}"),
            "scheduler_token_env: the environment variable \"GRANARY_TEST_UNSET_VARIABLE\" is not set",
        ),
        (
            format!(
                "[datasets]\nadmin_token = \"0123456789abcdef\"\nadmin_token_env = \"X\"\n{mount}"
            ),
            "give one of datasets.admin_token, datasets.admin_token_file and datasets.admin_token_env",
        ),
        (
            format!(
                "[datasets]\nadmin_token = \"0123456789abcdef\"\nscheduler_token = \"0123456789abcdef\"\n{mount}"
            ),
            "must differ from the admin's",
        ),
        (
            format!("[[tenant]]\nname = \"a\"\n{mount}"),
            "give its token as token_file",
        ),
        (
            format!(
                "[[tenant]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\nquota_files = -1\n{mount}"
            ),
            "quota_files",
        ),
    ];
    for (text, needle) in cases {
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?}: {err}");
    }
}
