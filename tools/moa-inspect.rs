//! moa-inspect: print a GGUF file's header (metadata and tensor table), as text or JSON, or
//! write one tensor dequantized to f32.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use moa::gguf::GgufFile;

#[derive(Parser)]
#[command(name = "moa-inspect", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MOA_GIT_REV"), ")"))]
#[command(about = "Show the metadata and tensors of a GGUF file, or extract one tensor as f32")]
struct Args {
    /// The GGUF file.
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Print arrays in full (by default only their first items).
    #[arg(long)]
    full: bool,
    /// Extract this tensor (with --out) instead of printing the header.
    #[arg(long, value_name = "NAME", requires = "out")]
    tensor: Option<String>,
    /// Where to write the tensor: f32 little-endian, ggml element order.
    #[arg(long, value_name = "PATH", requires = "tensor")]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let file = GgufFile::open(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let path = args.file.display().to_string();

    if let (Some(name), Some(out)) = (&args.tensor, &args.out) {
        let (info, _) = file.tensor(name)?;
        if !info.ty.can_dequantize() {
            bail!(
                "tensor {name:?} has type {}, which moa cannot dequantize yet",
                info.ty
            );
        }
        let values = file.dequantize(name)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        moa::util::write_file_atomic(out, &bytes)
            .with_context(|| format!("cannot write {}", out.display()))?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"tensor": name, "type": info.ty.name(), "shape": info.dims, "n_elements": values.len(), "out": out})
            );
        } else {
            eprintln!(
                "wrote {} ({} {:?}, {} f32 values) to {}",
                name,
                info.ty,
                info.dims,
                values.len(),
                out.display()
            );
        }
        return Ok(());
    }

    let mut stdout = std::io::stdout().lock();
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&moa::inspect::to_json(&path, &file, args.full))?;
        s.push('\n');
        s
    } else {
        moa::inspect::to_text(&path, &file, args.full)
    };
    // A closed pipe (e.g. `| head`) is not an error worth a message.
    match stdout.write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(Into::into),
    }
}
