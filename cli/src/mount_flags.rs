//! The FUSE client's flags, shared by `granary up` and `granary mount` (`#[command(flatten)]`),
//! with the defaults of [`FsConfig`], so the two commands and the library cannot drift apart.

use anyhow::Context;
use clap::Args;
use granary_core::{ByteSize, format_duration, parse_duration};
use granary_fuse_client::FsConfig;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MountFlags {
    /// Readahead per open file.
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(FsConfig::default().readahead_per_file))]
    pub readahead: ByteSize,
    /// Readahead across all open files.
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(FsConfig::default().readahead_total))]
    pub readahead_total: ByteSize,
    /// How long the kernel keeps the entries of a pinned dataset's files while the worker's pins
    /// stay the same (it is told to drop them as soon as they change; at least the attribute TTL).
    #[arg(long, value_name = "DURATION", default_value_t = format_duration(FsConfig::default().pinned_ttl))]
    pub pinned_ttl: String,
    /// Never open local copies of pinned files with kernel FUSE passthrough (read them through
    /// the daemon instead).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Take kernel requests over FUSE-over-io_uring (Linux 6.14+; as root this turns on the fuse
    /// module's enable_uring): one ring per CPU, answered on the requester's CPU. Faster opens,
    /// stats and small reads (pinned datasets: passthrough opens), one more copy on large reads
    /// through the daemon. Without it, or where the kernel lacks it: /dev/fuse.
    #[arg(long, env = "GRANARY_IO_URING", value_parser = clap::builder::BoolishValueParser::new())]
    pub io_uring: bool,
    /// The job or pod this mount serves: a label of its data-stall metric (keep it low-cardinality).
    #[arg(long, value_name = "NAME", env = "GRANARY_JOB", default_value = "")]
    pub job: String,
    /// The CSI driver's pod records (`granary csi --pods-dir`): reads by a pod the driver
    /// published a volume for carry that pod's `namespace/job` as their job label instead of
    /// --job. The server must see the pods' processes (the host's PID namespace).
    #[arg(long, value_name = "DIR")]
    pub pods_dir: Option<std::path::PathBuf>,
    /// Let other users than the one mounting read through the mount (FUSE allow_other; training
    /// pods usually run as another user than the node's mount). Each file's mode bits, as the
    /// source has them, still decide who may read it. Off: only the mounting user may.
    #[arg(long)]
    pub allow_other: bool,
    /// Unmount when this process exits, however it exits (kill -9 included; FUSE auto_unmount
    /// through fusermount3): no dead mount is left behind. A dead Granary mount found on the
    /// mount point is detached and mounted afresh either way.
    #[arg(long)]
    pub auto_unmount: bool,
    /// Serve the mount from this process alone, with no keeper: when it dies, the mount dies
    /// with it. By default a small keeper process holds the mount and runs the FUSE server as
    /// its child, starting another (which takes the mount over) when one dies, and the binary
    /// on disk on SIGHUP. With --io-uring there is no keeper yet.
    #[arg(long)]
    pub no_keeper: bool,
    /// Inodes kept for the kernel at most; past it the kernel is asked to drop the least
    /// recently used entries it is not using (so a walk of millions of files stays bounded).
    #[arg(long, value_name = "N", default_value_t = FsConfig::default().max_inodes as u64,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_inodes: u64,
    /// Open file and directory handles at most; an open beyond fails with ENFILE.
    #[arg(long, value_name = "N", default_value_t = FsConfig::default().max_handles as u64,
          value_parser = clap::value_parser!(u64).range(64..))]
    pub max_handles: u64,
    /// Bytes of hinted files (`granary hint`) fetched ahead of the job at most; they go to the
    /// worker's memory tier. 0: an eighth of the worker's memory cache.
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(FsConfig::default().hint_budget))]
    pub hint_budget: ByteSize,
}

impl MountFlags {
    /// What a keeper mounts at `dir` as `fsname`, if this mount is to have one.
    pub fn kept(
        &self,
        dir: &std::path::Path,
        fsname: String,
        attr_ttl: Duration,
    ) -> anyhow::Result<Option<crate::keeper::Kept>> {
        let config = self.fs_config(attr_ttl)?;
        if self.no_keeper || self.io_uring {
            return Ok(None);
        }
        Ok(Some(crate::keeper::Kept {
            dir: dir.to_path_buf(),
            fsname,
            config,
        }))
    }
}

/// The default attribute TTL, as a flag default.
pub fn default_attr_ttl() -> String {
    format_duration(FsConfig::default().attr_ttl)
}

impl MountFlags {
    /// The client's configuration: these flags, `attr_ttl`, and the caller's uid and gid.
    pub fn fs_config(&self, attr_ttl: Duration) -> anyhow::Result<FsConfig> {
        Ok(FsConfig {
            attr_ttl,
            pinned_ttl: parse_duration(&self.pinned_ttl).context("--pinned-ttl")?,
            readahead_per_file: self.readahead.bytes(),
            readahead_total: self.readahead_total.bytes(),
            passthrough: !self.no_passthrough,
            io_uring: self.io_uring,
            allow_other: self.allow_other,
            auto_unmount: self.auto_unmount,
            job: self.job.clone(),
            pods_dir: self.pods_dir.clone(),
            max_inodes: self.max_inodes as usize,
            max_handles: self.max_handles as usize,
            hint_budget: self.hint_budget.bytes(),
            uid: current_uid(),
            gid: current_gid(),
            ..FsConfig::default()
        })
    }
}

fn current_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0)
}

fn current_gid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .unwrap_or(0)
}

/// The client's configuration from a worker's `[fuse]` section: each key left out takes the
/// default of the flag of the same name; `attr_ttl` defaults to the worker's metadata TTL.
pub fn fuse_section_config(
    section: &granary_cache_server::config::FuseSection,
    metadata_ttl: Duration,
) -> anyhow::Result<FsConfig> {
    let d = FsConfig::default();
    let size = |key: &str, value: &Option<String>, default: u64| -> anyhow::Result<u64> {
        match value {
            Some(v) => Ok(v
                .parse::<ByteSize>()
                .map_err(|e| anyhow::anyhow!("[fuse] {key} = {v:?}: {e}"))?
                .bytes()),
            None => Ok(default),
        }
    };
    let duration = |key: &str, value: &Option<String>, default: Duration| match value {
        Some(v) => parse_duration(v).with_context(|| format!("[fuse] {key} = {v:?}")),
        None => Ok(default),
    };
    let max_inodes = section.max_inodes.unwrap_or(d.max_inodes);
    if max_inodes < 1024 {
        anyhow::bail!("[fuse] max_inodes = {max_inodes}: give at least 1024");
    }
    let max_handles = section.max_handles.unwrap_or(d.max_handles);
    if max_handles < 64 {
        anyhow::bail!("[fuse] max_handles = {max_handles}: give at least 64");
    }
    Ok(FsConfig {
        attr_ttl: duration("attr_ttl", &section.attr_ttl, metadata_ttl)?,
        pinned_ttl: duration("pinned_ttl", &section.pinned_ttl, d.pinned_ttl)?,
        readahead_per_file: size("readahead", &section.readahead, d.readahead_per_file)?,
        readahead_total: size(
            "readahead_total",
            &section.readahead_total,
            d.readahead_total,
        )?,
        passthrough: section.passthrough.unwrap_or(d.passthrough),
        io_uring: section.io_uring.unwrap_or(d.io_uring),
        allow_other: section.allow_other.unwrap_or(d.allow_other),
        auto_unmount: section.auto_unmount.unwrap_or(d.auto_unmount),
        job: section.job.clone().unwrap_or_default(),
        pods_dir: section.pods_dir.clone(),
        max_inodes,
        max_handles,
        hint_budget: size("hint_budget", &section.hint_budget, d.hint_budget)?,
        uid: current_uid(),
        gid: current_gid(),
        ..d
    })
}
