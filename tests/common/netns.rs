//! Network namespaces that a test makes (and deletes), for what loopback alone cannot show:
//! iptables rules, addresses that come and go. They need root; [`unavailable`] fails a test that
//! cannot make one, unless [`OPT_OUT`] is set.

use std::process::{Command, Stdio};

/// A network namespace deleted on drop.
pub struct NetNs(pub String);

impl NetNs {
    pub fn create(name: &str) -> Option<NetNs> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .ok()?
            .success();
        ok.then(|| NetNs(name.to_string()))
    }
    pub fn exec(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.0.clone()]
    }
    pub fn run(&self, args: &[&str]) -> bool {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output();
        match out {
            Ok(o) if o.status.success() => true,
            Ok(o) => {
                eprintln!("{args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
                false
            }
            Err(e) => {
                eprintln!("{args:?} failed: {e}");
                false
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The environment variable that lets a test skip what the machine cannot do (set to `1`).
pub const OPT_OUT: &str = "TASMAN_SKIP_NETNS";

/// The machine cannot run (part of) a test because of `why`: a failure, naming what the test
/// `needs`, unless [`OPT_OUT`] is set to 1, in which case the skip is printed and the caller
/// leaves that part out.
pub fn unavailable(why: &str, needs: &str) {
    if std::env::var(OPT_OUT).is_ok_and(|v| v == "1") {
        // Written to the process's stderr itself, not through `eprintln!`: the test harness
        // captures the print macros of a passing test, and a skip must be seen.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), "SKIPPED ({OPT_OUT}=1): {why}");
        return;
    }
    panic!(
        "{why}. This test needs {needs} (run scripts/deps as root); set {OPT_OUT}=1 to skip it \
         on a machine that cannot make network namespaces"
    );
}
