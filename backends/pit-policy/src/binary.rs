//! Which QEMU a process runs, and its version, read from the executable the process has
//! mapped rather than from the command line: the file at a path may have been upgraded since
//! the process started, and a QEMU started through a dynamic loader (as `setup.sh`'s launchers
//! do) has the loader as its `/proc/PID/exe`.
//!
//! The version is the one compiled into the binary: QEMU prints
//! `"QEMU emulator version " QEMU_FULL_VERSION` for `--version`, and that literal sits in the
//! executable (`QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`). Reading it
//! runs nothing.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use devshare_common::qemu::{QemuVersion, VERSION_BANNER};

/// Why the version of a running QEMU could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// /proc could not be read.
    #[error("cannot read {path}: {source}")]
    Proc {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// Neither `/proc/PID/exe` nor any mapping of the process is a `qemu-system-*` file.
    #[error("process {0} has no qemu-system-* executable mapped")]
    NoExecutable(u32),
    /// The executable holds no `QEMU emulator version` string (in the part that is read).
    #[error("{0} holds no \"QEMU emulator version\" string in its first {MAX_SCAN_MIB} MiB")]
    NoVersion(PathBuf),
}

fn is_qemu(path: &str) -> bool {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("qemu-system-"))
}

/// A file through which the QEMU executable process `pid` runs can be read: `/proc/PID/exe`
/// when QEMU was started directly, else the `/proc/PID/map_files/` entry of its mapping (the
/// very file mapped, even if the path now holds another one), else the mapped path.
pub fn running_executable(proc_root: &Path, pid: u32) -> Result<PathBuf, BinaryError> {
    let dir = proc_root.join(pid.to_string());
    let exe = dir.join("exe");
    if let Ok(target) = std::fs::read_link(&exe) {
        if is_qemu(&target.to_string_lossy()) {
            return Ok(exe);
        }
    }
    let maps_path = dir.join("maps");
    let maps = std::fs::read_to_string(&maps_path).map_err(|source| BinaryError::Proc {
        path: maps_path,
        source,
    })?;
    // Fields: range perms offset dev inode path (the path may contain spaces).
    let (range, path) = maps
        .lines()
        .find_map(|line| {
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let path = fields.nth(4)?.trim_start();
            is_qemu(path).then(|| (range.to_owned(), path.to_owned()))
        })
        .ok_or(BinaryError::NoExecutable(pid))?;
    let mapped = dir.join("map_files").join(range);
    if File::open(&mapped).is_ok() {
        return Ok(mapped);
    }
    Ok(PathBuf::from(
        path.strip_suffix(" (deleted)").unwrap_or(&path),
    ))
}

/// How much of an executable [`version_in_file`] reads, in MiB. The banner is in `.rodata`,
/// which comes before the debug sections: at 10 to 13 MiB in Debian's QEMU 7.2 to 11.1
/// (18 to 31 MiB files). Any process may be named `qemu-system-*`, so an 8 GB file must not
/// be read to its end.
pub const MAX_SCAN_MIB: usize = 64;

/// The version compiled into the QEMU binary at `path`, from its first [`MAX_SCAN_MIB`] MiB.
pub fn version_in_file(path: &Path) -> Result<QemuVersion, BinaryError> {
    let proc_err = |source| BinaryError::Proc {
        path: path.to_owned(),
        source,
    };
    // Enough after the banner for "MAJOR.MINOR.MICRO"; the rest of a chunk is searched.
    const AFTER: usize = 32;
    const CHUNK: usize = 1 << 20;
    let finder = memchr::memmem::Finder::new(VERSION_BANNER.as_bytes());
    let keep = VERSION_BANNER.len() + AFTER;
    let mut file = File::open(path).map_err(proc_err)?;
    let mut buf = vec![0u8; CHUNK + keep];
    let mut len = 0;
    let mut total = 0;
    loop {
        let room = (buf.len() - len).min((MAX_SCAN_MIB << 20) - total);
        let n = read_some(&mut file, &mut buf[len..len + room]).map_err(proc_err)?;
        len += n;
        total += n;
        let eof = n == 0;
        if let Some(pos) = finder.find(&buf[..len]) {
            if eof || len - pos >= keep {
                let text = String::from_utf8_lossy(&buf[pos..len.min(pos + keep)]);
                return QemuVersion::from_version_output(&text)
                    .ok_or_else(|| BinaryError::NoVersion(path.to_owned()));
            }
            // The digits are in the next read: keep the banner.
            buf.copy_within(pos..len, 0);
            len -= pos;
            continue;
        }
        if eof {
            return Err(BinaryError::NoVersion(path.to_owned()));
        }
        // A banner cut at the end of this chunk is found with the next one.
        let tail = len.saturating_sub(keep);
        buf.copy_within(tail..len, 0);
        len -= tail;
    }
}

/// Reads into `buf` until it is full or the file ends; returns the bytes read.
fn read_some(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The version of the QEMU process `pid` runs (see the module doc).
pub fn process_qemu_version(proc_root: &Path, pid: u32) -> Result<QemuVersion, BinaryError> {
    version_in_file(&running_executable(proc_root, pid)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(parts: &[&[u8]]) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("qemu-system-x86_64");
        let mut f = File::create(&path).unwrap();
        for p in parts {
            f.write_all(p).unwrap();
        }
        (dir, path)
    }

    /// A private directory removed on drop (no crate needed for two tests).
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("pit-binary-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn finds_the_banner_anywhere_even_across_chunks() {
        let banner = b"QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n";
        for offset in [0usize, 100, (1 << 20) - 30, (1 << 20) - 3, 3 << 20] {
            let filler = vec![b'Q'; offset];
            let (_d, path) = file_with(&[&filler, banner, b"\0tail"]);
            assert_eq!(
                version_in_file(&path).unwrap(),
                QemuVersion::new(7, 2, 22),
                "banner at {offset}"
            );
        }
        // At the very end of the file, with nothing after the digits.
        let (_d, path) = file_with(&[&[0u8; 5000], b"QEMU emulator version 11.1.3"]);
        assert_eq!(version_in_file(&path).unwrap(), QemuVersion::new(11, 1, 3));
    }

    /// Any process may be named qemu-system-*: a huge (sparse) executable is read only as far
    /// as a real QEMU keeps its banner.
    #[test]
    fn only_the_first_mib_of_a_huge_executable_are_read() {
        use std::io::{Seek, SeekFrom};
        let banner = b"QEMU emulator version 9.2.1\0";
        for (at_mib, found) in [(MAX_SCAN_MIB - 4, true), (900, false)] {
            let (_d, path) = file_with(&[]);
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(8 << 30).unwrap();
            f.seek(SeekFrom::Start((at_mib as u64) << 20)).unwrap();
            f.write_all(banner).unwrap();
            drop(f);
            let r = version_in_file(&path);
            if found {
                assert_eq!(r.unwrap(), QemuVersion::new(9, 2, 1));
            } else {
                let e = r.unwrap_err();
                assert!(e.to_string().contains("first 64 MiB"), "{e}");
            }
        }
    }

    #[test]
    fn no_banner_is_a_clear_error() {
        let (_d, path) = file_with(&[b"QEMU emulator versio", &[0u8; 100]]);
        assert!(matches!(
            version_in_file(&path),
            Err(BinaryError::NoVersion(_))
        ));
        assert!(matches!(
            process_qemu_version(Path::new("/proc"), std::process::id()),
            Err(BinaryError::NoExecutable(_))
        ));
    }
}
