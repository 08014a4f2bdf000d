//! A service of one test's own (started with scripts/services/NAME.sh), so that the test can
//! stop, pause or restart it without disturbing the shared ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct OwnService {
    name: &'static str,
    state: tempfile::TempDir,
    env: HashMap<String, String>,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../scripts/services/{name}.sh"))
}

impl OwnService {
    /// Starts `scripts/services/NAME.sh start` in a fresh state directory.
    pub fn start(name: &'static str) -> OwnService {
        let state = tempfile::tempdir().unwrap();
        let ok = Command::new("bash")
            .arg(script(name))
            .arg("start")
            .arg(state.path())
            .status()
            .unwrap();
        assert!(ok.success(), "{name}.sh start");
        let text = std::fs::read_to_string(state.path().join(format!("{name}.env"))).unwrap();
        let env = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        OwnService { name, state, env }
    }

    /// A variable the service's env file exports.
    pub fn get(&self, var: &str) -> String {
        self.env
            .get(var)
            .unwrap_or_else(|| panic!("{var} in {}.env", self.name))
            .clone()
    }

    /// The pid the script recorded for the service's daemon.
    pub fn pid(&self) -> u32 {
        let dir = self.state.path().join(self.name);
        let pidfile = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "pid"))
            .unwrap_or_else(|| panic!("no pid file in {}", dir.display()));
        std::fs::read_to_string(pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn stop(&self) {
        let _ = Command::new("bash")
            .arg(script(self.name))
            .arg("stop")
            .arg(self.state.path())
            .status();
    }
}

impl Drop for OwnService {
    fn drop(&mut self) {
        self.stop();
    }
}
