//! Writes every target's seed inputs into `corpus/<target>/seed-<name>` (run from `fuzz/`,
//! or through `scripts/fuzz.sh --write-seeds`).

use std::path::Path;

use devshare_fuzz::seed::Seed;

fn write<T: Seed>(target: &str, seeds: Vec<(&str, T)>) -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir)?;
    for (name, input) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), input.to_input())?;
    }
    Ok(())
}

fn write_raw(target: &str, seeds: Vec<(&str, Vec<u8>)>) -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir)?;
    for (name, input) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), input)?;
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    write("relay", devshare_fuzz::relay::seeds())?;
    write("ring", devshare_fuzz::ring::seeds())?;
    write("control", devshare_fuzz::control::seeds())?;
    write("net", devshare_fuzz::net::seeds())?;
    write_raw("config", devshare_fuzz::config::seeds())?;
    Ok(())
}
