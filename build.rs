//! Records a build time the device can trust as a lower bound for its clock: a clock earlier
//! than the build of the running updater is wrong. `SOURCE_DATE_EPOCH` when set (reproducible
//! builds), else the time of the checked-out commit, else 0 (no bound).

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let time = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["log", "-1", "--format=%ct"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    println!("cargo:rustc-env=EDGE_OTA_BUILD_TIME={time}");
}
