//! Build script: records the git revision for `--version` output and re-runs when CUDA kernel
//! sources change (kernels are compiled at run time through NVRTC, not here).
fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=.git/HEAD");
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MOA_GIT_REV={rev}");
}
