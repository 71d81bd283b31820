//! The host's initramfs: busybox-static, an `/init` script and the user's
//! files, written as a `newc` cpio archive by [`Cpio`] (no root needed for
//! the device nodes, no `cpio` tool needed).
//!
//! `/init` mounts proc, sys, devtmpfs, devpts and a tmpfs on /tmp, prints
//! [`Markers::userspace`] (the boot benchmark's stop point), then either runs
//! `/exec.sh` between [`Markers::begin`] and `<Markers::exit> <status>` and
//! powers off with `poweroff -f`, or hands over to busybox `init`, which
//! starts a shell on the console; `poweroff` there ends QEMU.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, Context, Result};

/// Writes a `newc` ("070701") cpio archive in memory.
#[derive(Debug, Default)]
pub struct Cpio {
    data: Vec<u8>,
    next_ino: u32,
}

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// A cpio entry is limited to 4 GiB minus one by its 8-hex-digit size field.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLarge {
    /// The archive path of the entry.
    pub name: String,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, perm: u32) {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
            .expect("an empty body always fits");
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, body: &[u8]) -> Result<(), TooLarge> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), body)
    }

    /// Adds a symbolic link `name -> target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        // A link target is a path, far below the 4 GiB limit.
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
            .expect("a symlink target is short");
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
            .expect("an empty body always fits");
    }

    /// Ends the archive with its trailer and returns the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])
            .expect("the trailer is empty");
        self.data
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        body: &[u8],
    ) -> Result<(), TooLarge> {
        let name = name.trim_start_matches('/');
        let size = u32::try_from(body.len()).map_err(|_| TooLarge {
            name: name.to_string(),
        })?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| TooLarge {
            name: name.to_string(),
        })?;
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino += 1;
            self.next_ino
        };
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }
}

/// Marker lines `/init` prints; the nonce makes them unlike anything a
/// command prints by chance.
#[derive(Debug, Clone)]
pub struct Markers {
    nonce: String,
}

impl Markers {
    /// Markers with the given nonce (letters and digits).
    pub fn new(nonce: &str) -> Self {
        let nonce = nonce.chars().filter(char::is_ascii_alphanumeric).collect();
        Self { nonce }
    }

    /// A nonce from the clock and the process id.
    pub fn fresh() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self::new(&format!("{:x}{:x}", t & 0xffff_ffff, std::process::id()))
    }

    /// Printed once user space runs (followed by the guest's uptime).
    pub fn userspace(&self) -> String {
        format!("@@USERSPACE-{}@@", self.nonce)
    }

    /// Printed right before the command runs.
    pub fn begin(&self) -> String {
        format!("@@BEGIN-{}@@", self.nonce)
    }

    /// Printed after the command, followed by its exit status.
    pub fn exit(&self) -> String {
        format!("@@EXIT-{}@@", self.nonce)
    }

    /// Printed by the interactive shell's profile before the first prompt.
    pub fn shell_ready(&self) -> String {
        format!("@@SHELL-{}@@", self.nonce)
    }

    /// Splits a console line holding the exit marker into the command's
    /// output before it (a last line without a newline) and the status.
    pub fn split_exit<'a>(&self, line: &'a str) -> Option<(&'a str, i32)> {
        let mark = self.exit();
        let pos = line.find(&mark)?;
        let status = line[pos + mark.len()..].trim().parse().ok()?;
        Some((&line[..pos], status))
    }
}

/// What `/init` does after setting up.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Runs this shell script and powers off.
    Exec {
        /// The script (`/exec.sh`).
        script: String,
        /// Lower the console log level while the command runs.
        quiet: bool,
    },
    /// Starts a shell on the console.
    Interactive,
}

/// A file from the build machine to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extra {
    /// The file on the build machine.
    pub source: std::path::PathBuf,
    /// Absolute path inside the initramfs.
    pub dest: String,
}

/// Everything an initramfs is made from.
#[derive(Debug)]
pub struct Spec<'a> {
    /// The static arm64 busybox.
    pub busybox: &'a Path,
    /// What `/init` does.
    pub mode: Mode,
    /// Marker lines.
    pub markers: &'a Markers,
    /// Extra files.
    pub extras: &'a [Extra],
}

/// Directories created in the image (all 0755 but /tmp, /root).
const DIRS: &[&str] = &[
    "bin",
    "sbin",
    "usr",
    "usr/bin",
    "usr/sbin",
    "dev",
    "proc",
    "sys",
    "tmp",
    "run",
    "root",
    "etc",
    "mnt",
    "lib",
    "lib/modules",
];

/// Builds the archive.
pub fn build(spec: &Spec<'_>) -> Result<Vec<u8>> {
    let busybox = fs::read(spec.busybox).with_context(|| spec.busybox.display().to_string())?;
    let mut cpio = Cpio::new();
    for d in DIRS {
        let perm = match *d {
            "tmp" => 0o1777,
            "root" => 0o700,
            _ => 0o755,
        };
        cpio.dir(d, perm);
    }
    // The kernel opens /dev/console before /init runs; devtmpfs comes later.
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.file("bin/busybox", 0o755, &busybox)
        .map_err(|e| anyhow!("{} is too large", e.name))?;
    cpio.symlink("bin/sh", "busybox");
    cpio.file(
        "init",
        0o755,
        init_script(spec.markers, &spec.mode).as_bytes(),
    )
    .map_err(|e| anyhow!("{} is too large", e.name))?;
    cpio.file("etc/inittab", 0o644, INITTAB.as_bytes())
        .map_err(|e| anyhow!("{} is too large", e.name))?;
    cpio.file("etc/profile", 0o644, profile(spec.markers).as_bytes())
        .map_err(|e| anyhow!("{} is too large", e.name))?;
    if let Mode::Exec { script, .. } = &spec.mode {
        cpio.file("exec.sh", 0o755, script.as_bytes())
            .map_err(|e| anyhow!("{} is too large", e.name))?;
    }
    let mut made: Vec<String> = DIRS.iter().map(|d| d.to_string()).collect();
    for extra in spec.extras {
        let body =
            fs::read(&extra.source).with_context(|| format!("--add {}", extra.source.display()))?;
        let dest = extra.dest.trim_start_matches('/');
        // Parent directories the image does not have yet.
        let mut parent = String::new();
        for part in dest
            .split('/')
            .take(dest.split('/').count().saturating_sub(1))
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !made.contains(&parent) {
                cpio.dir(&parent, 0o755);
                made.push(parent.clone());
            }
        }
        let perm = file_perm(&extra.source);
        cpio.file(dest, perm, &body)
            .map_err(|e| anyhow!("--add {}: too large", e.name))?;
    }
    Ok(cpio.finish())
}

#[cfg(unix)]
fn file_perm(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn file_perm(_: &Path) -> u32 {
    0o644
}

/// busybox init's table for the interactive case: a shell with a
/// controlling terminal on whatever the console is.
const INITTAB: &str = "\
::respawn:/bin/cttyhack /bin/sh -l
::shutdown:/bin/sync
";

fn profile(m: &Markers) -> String {
    format!(
        "export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root\n\
         export PS1='host:\\w# '\n\
         cd /root\n\
         echo '{}'\n\
         echo \"Linux $(uname -r) on $(grep -c ^processor /proc/cpuinfo) CPUs; 'poweroff' ends QEMU.\"\n",
        m.shell_ready()
    )
}

/// The `/init` script.
pub fn init_script(m: &Markers, mode: &Mode) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mkdir -p /dev/pts /dev/shm\n\
         mount -t devpts devpts /dev/pts\n\
         mount -t tmpfs tmpfs /tmp\n\
         mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n\
         hostname host\n",
    );
    s.push_str(&format!(
        "echo \"{} $(cut -d' ' -f1 /proc/uptime)\"\n",
        m.userspace()
    ));
    match mode {
        Mode::Exec { quiet, .. } => {
            if *quiet {
                s.push_str("dmesg -n 1\n");
            }
            s.push_str(&format!(
                "cd /root\n\
                 echo '{}'\n\
                 /bin/sh /exec.sh\n\
                 echo \"{} $?\"\n\
                 poweroff -f\n",
                m.begin(),
                m.exit()
            ));
        }
        Mode::Interactive => s.push_str("exec /bin/busybox init\n"),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back (name, mode, rdev major, body) of every entry.
    fn parse(mut data: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let field = |h: &[u8], i: usize| {
            let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&data[..6], b"070701", "magic at offset {off}");
            let mode = field(data, 1);
            let size = field(data, 6) as usize;
            let major = field(data, 9);
            let namesize = field(data, 11) as usize;
            let name = std::str::from_utf8(&data[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(data[110 + namesize - 1], 0);
            let body_at = (110 + namesize).next_multiple_of(4);
            let body = data[body_at..body_at + size].to_vec();
            let next = (body_at + size).next_multiple_of(4);
            off += next;
            data = &data[next..];
            if name == "TRAILER!!!" {
                assert!(data.is_empty(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode, major, body));
        }
    }

    #[test]
    fn archive_round_trips() {
        let mut c = Cpio::new();
        c.dir("/bin", 0o755);
        c.file("bin/a", 0o755, b"hello").unwrap();
        c.file("b", 0o644, b"").unwrap();
        c.symlink("bin/sh", "busybox");
        c.char_dev("dev/console", 0o600, 5, 1);
        let entries = parse(&c.finish());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/a", "b", "bin/sh", "dev/console"]);
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[1].3, b"hello");
        assert_eq!(entries[3].1, S_IFLNK | 0o777);
        assert_eq!(entries[3].3, b"busybox");
        assert_eq!((entries[4].1, entries[4].2), (S_IFCHR | 0o600, 5));
    }

    #[test]
    fn image_has_init_busybox_and_extras() {
        let dir = std::env::temp_dir().join(format!("xtask-initramfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let bb = dir.join("busybox");
        fs::write(&bb, b"\x7fELF fake").unwrap();
        let extra = dir.join("tool");
        fs::write(&extra, b"payload").unwrap();
        let m = Markers::new("abc");
        let spec = Spec {
            busybox: &bb,
            mode: Mode::Exec {
                script: "echo hi\n".into(),
                quiet: true,
            },
            markers: &m,
            extras: &[Extra {
                source: extra.clone(),
                dest: "/opt/t/tool".into(),
            }],
        };
        let entries = parse(&build(&spec).unwrap());
        let find = |n: &str| entries.iter().find(|e| e.0 == n).map(|e| e.3.clone());
        assert_eq!(find("bin/busybox").unwrap(), b"\x7fELF fake");
        assert_eq!(find("exec.sh").unwrap(), b"echo hi\n");
        assert_eq!(find("opt/t/tool").unwrap(), b"payload");
        assert!(find("opt").is_some() && find("opt/t").is_some());
        let init = String::from_utf8(find("init").unwrap()).unwrap();
        assert!(init.contains("@@BEGIN-abc@@") && init.contains("poweroff -f"));
        assert!(init.contains("dmesg -n 1"));
        let missing = Spec {
            extras: &[Extra {
                source: dir.join("nope"),
                dest: "/x".into(),
            }],
            ..spec
        };
        assert!(format!("{:#}", build(&missing).unwrap_err()).contains("nope"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interactive_init_hands_over_to_busybox_init() {
        let m = Markers::new("n1");
        let init = init_script(&m, &Mode::Interactive);
        assert!(init.ends_with("exec /bin/busybox init\n"));
        assert!(!init.contains("exec.sh"));
        assert!(init.contains("@@USERSPACE-n1@@"));
    }

    #[test]
    fn exit_marker_is_parsed() {
        let m = Markers::new("x-y!z");
        assert_eq!(m.exit(), "@@EXIT-xyz@@");
        assert_eq!(m.split_exit("@@EXIT-xyz@@ 3\r"), Some(("", 3)));
        assert_eq!(
            m.split_exit("no newline@@EXIT-xyz@@ 0"),
            Some(("no newline", 0))
        );
        assert_eq!(m.split_exit("@@EXIT-xyz@@ $?"), None);
        assert_eq!(m.split_exit("@@EXIT-other@@ 0"), None);
        assert_eq!(m.split_exit("echo \"@@EXIT-xyz@@ $?\""), None);
    }
}
