//! What the MariaDB client programs the agent runs (mariadb-dump) are
//! given: a password, never in their environment (`MYSQL_PWD`, which any
//! process of the same user can read in /proc, and which MariaDB itself
//! calls insecure) nor on their command line (`ps`), but in an option file
//! of their own, private to the account they run as (0600) and removed as
//! soon as they are done.
//!
//! The file is passed with `--defaults-file`, which also means no other
//! option file is read (as `--no-defaults` did): nothing from /etc/mysql.

use super::os::{self, Account};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A `[client]` option file with a password; removed when dropped.
#[derive(Debug)]
pub struct OptionFile {
    path: PathBuf,
}

impl OptionFile {
    /// Writes it in `dir` (a directory only `acct` and root reach), `acct`'s
    /// and 0600.
    pub fn create(dir: &Path, password: &str, acct: &Account) -> Result<OptionFile> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = dir.join(format!("client-{}-{n}.cnf", std::process::id()));
        os::write_owned(&path, &render(password), acct)?;
        Ok(OptionFile { path })
    }

    /// The argument naming it; it must come first on the command line.
    pub fn arg(&self) -> String {
        format!("--defaults-file={}", self.path.display())
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OptionFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The file's text: the password double-quoted, with the escapes option
/// files read back (`\\`, `\"`, `\n`, `\r`, `\t`).
fn render(password: &str) -> String {
    let mut q = String::with_capacity(password.len() + 2);
    for c in password.chars() {
        match c {
            '\\' => q.push_str("\\\\"),
            '"' => q.push_str("\\\""),
            '\n' => q.push_str("\\n"),
            '\r' => q.push_str("\\r"),
            '\t' => q.push_str("\\t"),
            c => q.push(c),
        }
    }
    format!("# Written by corral-agent for one client run; removed after it.\n[client]\npassword=\"{q}\"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clone's mariadb-dump gets the password from its option file
    /// alone: not from its environment, not from its arguments.
    #[test]
    fn a_dump_has_no_password_in_its_environment_or_arguments() {
        let dir = tempfile::tempdir().unwrap();
        // Any unprivileged account will do: nothing runs.
        let acct = Account::lookup("nobody", "").unwrap();
        let password = "s3cret-for-the-dump";
        let options = OptionFile::create(dir.path(), password, &acct).unwrap();
        let m = super::super::Mariadb::new(dir.path(), "vm1");
        let up = crate::engine::Upstream {
            node: "vm2".into(),
            host: "10.0.0.2".into(),
            port: 3306,
        };
        let Ok(cmd) = m.dump_command(&up, &options, &acct) else {
            eprintln!("mariadb-dump is not installed; skipped");
            return;
        };
        let cmd = cmd.as_std();
        for (k, v) in cmd.get_envs() {
            let v = v
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_default();
            assert!(k != "MYSQL_PWD" && !v.contains(password), "{k:?}={v}");
        }
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.iter().all(|a| !a.contains(password)), "{args:?}");
        assert_eq!(args[0], options.arg(), "--defaults-file comes first");
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(options.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        assert_eq!(meta.uid(), nobody.uid.as_raw());
        assert!(std::fs::read_to_string(options.path())
            .unwrap()
            .contains(password));
        let path = options.path().to_path_buf();
        drop(options);
        assert!(!path.exists(), "removed after use");
    }

    #[test]
    fn quoting() {
        assert!(render("a\"b\\c #d").contains("password=\"a\\\"b\\\\c #d\"\n"));
    }
}
