//! A pseudo-terminal for `warren exec` through the helper.
//!
//! The helper starts the program in a session of its own (it must never
//! share the helper's or the caller's process group), so it cannot have the
//! caller's terminal as its controlling terminal: that belongs to the
//! caller's shell. Programs that open `/dev/tty` (ssh and sudo asking for a
//! password, full-screen editors, job control) need one. So, as ssh and
//! sudo do, `warren exec` opens a pseudo-terminal shaped like the caller's
//! terminal (its modes and size), hands the program the pty's terminal side
//! (which the helper makes the program's controlling terminal), puts the
//! caller's terminal into raw mode and copies bytes between the two until
//! the program's side is closed. Window size changes follow (SIGWINCH).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Whether `fd` is a terminal.
pub fn is_tty(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

/// Both ends of a pseudo-terminal.
#[derive(Debug)]
pub struct Pty {
    /// The side `warren exec` reads and writes.
    pub master: OwnedFd,
    /// The terminal the program gets.
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal with `like`'s modes and window size.
pub fn open_like(like: BorrowedFd<'_>) -> io::Result<Pty> {
    // SAFETY: termios and winsize are plain data; zero is valid.
    let (mut t, mut ws): (libc::termios, libc::winsize) = unsafe { std::mem::zeroed() };
    // SAFETY: writes into the live struct above.
    let have_t = unsafe { libc::tcgetattr(like.as_raw_fd(), &mut t) } == 0;
    // SAFETY: writes into the live struct above.
    let have_ws = unsafe { libc::ioctl(like.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } == 0;
    let (mut m, mut s): (RawFd, RawFd) = (-1, -1);
    // SAFETY: openpty writes two descriptors; the optional structs are
    // live or null.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            if have_t { &t } else { std::ptr::null() },
            if have_ws { &ws } else { std::ptr::null() },
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty returned two new descriptors that nobody else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    for fd in [&master, &slave] {
        // SAFETY: sets close-on-exec on our own descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(Pty { master, slave })
}

/// Copies `from`'s window size to `to` (the program then gets SIGWINCH
/// from its terminal).
pub fn copy_winsize(from: BorrowedFd<'_>, to: BorrowedFd<'_>) {
    // SAFETY: winsize is plain data; the ioctls read/write it.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(from.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) == 0 {
            libc::ioctl(to.as_raw_fd(), libc::TIOCSWINSZ, &ws);
        }
    }
}

/// A terminal in raw mode; its modes come back when this is dropped.
#[derive(Debug)]
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// Puts `fd` into raw mode (bytes pass through unchanged: ^C goes to
    /// the program's terminal, which turns it into SIGINT there).
    pub fn enter(fd: BorrowedFd<'_>) -> io::Result<RawMode> {
        // SAFETY: plain data, filled by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: reads the terminal's modes into a live struct.
        if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut saved) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: sets modes from a live struct.
        if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSADRAIN, &raw) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode {
            fd: fd.as_raw_fd(),
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the modes saved from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved) };
    }
}

/// Copies the caller's input to the pty and the pty's output to `out`,
/// each on a thread of its own (blocking I/O: the caller's descriptors are
/// shared with its shell and must not be made non-blocking). The returned
/// receiver gets a message when the program's side has closed and all its
/// output has been written.
pub fn relay(
    master: OwnedFd,
    input: BorrowedFd<'_>,
    out: BorrowedFd<'_>,
) -> io::Result<std::sync::mpsc::Receiver<()>> {
    let master = File::from(master);
    let mut to_pty = master.try_clone()?;
    let mut from_pty = master;
    let mut input = File::from(input.try_clone_to_owned()?);
    let mut out = File::from(out.try_clone_to_owned()?);
    std::thread::Builder::new()
        .name("exec-input".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends when the caller's input ends or the pty is gone; a
            // thread still blocked in read ends with the process.
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 || to_pty.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        })?;
    let (done, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("exec-output".into())
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from_pty.read(&mut buf) {
                    // EIO: every holder of the program's side closed it.
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = out.flush();
            let _ = done.send(());
        })?;
    Ok(rx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_pty_carries_bytes_both_ways_and_takes_the_size() {
        // A first pty plays the caller's terminal.
        let outer = open_like(std::io::stdin().as_fd()).unwrap();
        let ws = libc::winsize {
            ws_row: 33,
            ws_col: 111,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: sets the size from a live struct.
        unsafe { libc::ioctl(outer.slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        let inner = open_like(outer.slave.as_fd()).unwrap();
        // SAFETY: plain data; zero is valid.
        let mut got: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: reads the size into a live struct.
        unsafe { libc::ioctl(inner.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut got) };
        assert_eq!((got.ws_row, got.ws_col), (33, 111));
        assert!(is_tty(inner.slave.as_fd()));
        // Raw mode on the inner slave, then written bytes come out of the
        // master unchanged (no CR/LF translation).
        {
            let _raw = RawMode::enter(inner.slave.as_fd()).unwrap();
            let mut s = File::from(inner.slave.try_clone().unwrap());
            s.write_all(b"a\nb").unwrap();
            let mut m = File::from(inner.master.try_clone().unwrap());
            let mut buf = [0u8; 16];
            let n = m.read(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"a\nb");
        }
        assert!(!is_tty(File::open("/dev/null").unwrap().as_fd()));
    }
}
