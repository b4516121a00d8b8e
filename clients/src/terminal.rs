//! The local terminal: whether stdin is one, its size and line-discipline settings (sent with
//! a pty request), raw mode that is always undone (on return, error, panic, or a signal that
//! ends the process: [`restore`]), and reading a secret from `/dev/tty` without echo.

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Mutex;

use nix::sys::termios::{
    self, ControlFlags, InputFlags, LocalFlags, OutputFlags, SetArg, SpecialCharacterIndices as C,
    Termios,
};
use russh::Pty;

/// Terminal settings to put back before the process ends: (fd, settings).
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

pub fn stdin_is_tty() -> bool {
    nix::unistd::isatty(std::io::stdin()).unwrap_or(false)
}

/// Columns and rows of the terminal on stdin (else stdout), if there is one.
pub fn window_size() -> Option<(u32, u32)> {
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        // SAFETY: an all-zero winsize is a valid value of this plain C struct.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which is valid and
        // exclusively borrowed for the call.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws as *mut libc::winsize) };
        if r == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
            return Some((u32::from(ws.ws_col), u32::from(ws.ws_row)));
        }
    }
    None
}

/// The local terminal's modes in the encoding of an SSH `pty-req` (RFC 4254 §8), so the
/// remote line discipline behaves like the local one (erase key, ^C, …).
pub fn pty_modes(fd: impl AsFd) -> Vec<(Pty, u32)> {
    let Ok(t) = termios::tcgetattr(fd) else {
        return Vec::new();
    };
    let mut modes = Vec::new();
    for (pty, index) in [
        (Pty::VINTR, C::VINTR),
        (Pty::VQUIT, C::VQUIT),
        (Pty::VERASE, C::VERASE),
        (Pty::VKILL, C::VKILL),
        (Pty::VEOF, C::VEOF),
        (Pty::VEOL, C::VEOL),
        (Pty::VEOL2, C::VEOL2),
        (Pty::VSTART, C::VSTART),
        (Pty::VSTOP, C::VSTOP),
        (Pty::VSUSP, C::VSUSP),
        (Pty::VREPRINT, C::VREPRINT),
        (Pty::VWERASE, C::VWERASE),
        (Pty::VLNEXT, C::VLNEXT),
        (Pty::VDISCARD, C::VDISCARD),
    ] {
        let v = t.control_chars[index as usize];
        // _POSIX_VDISABLE (0 on Linux) is 255 on the wire.
        modes.push((pty, if v == 0 { 255 } else { u32::from(v) }));
    }
    let i = t.input_flags;
    for (pty, flag) in [
        (Pty::IGNPAR, InputFlags::IGNPAR),
        (Pty::PARMRK, InputFlags::PARMRK),
        (Pty::INPCK, InputFlags::INPCK),
        (Pty::ISTRIP, InputFlags::ISTRIP),
        (Pty::INLCR, InputFlags::INLCR),
        (Pty::IGNCR, InputFlags::IGNCR),
        (Pty::ICRNL, InputFlags::ICRNL),
        (Pty::IXON, InputFlags::IXON),
        (Pty::IXANY, InputFlags::IXANY),
        (Pty::IXOFF, InputFlags::IXOFF),
        (Pty::IMAXBEL, InputFlags::IMAXBEL),
        (Pty::IUTF8, InputFlags::IUTF8),
    ] {
        modes.push((pty, u32::from(i.contains(flag))));
    }
    let l = t.local_flags;
    for (pty, flag) in [
        (Pty::ISIG, LocalFlags::ISIG),
        (Pty::ICANON, LocalFlags::ICANON),
        (Pty::ECHO, LocalFlags::ECHO),
        (Pty::ECHOE, LocalFlags::ECHOE),
        (Pty::ECHOK, LocalFlags::ECHOK),
        (Pty::ECHONL, LocalFlags::ECHONL),
        (Pty::NOFLSH, LocalFlags::NOFLSH),
        (Pty::TOSTOP, LocalFlags::TOSTOP),
        (Pty::IEXTEN, LocalFlags::IEXTEN),
        (Pty::ECHOCTL, LocalFlags::ECHOCTL),
        (Pty::ECHOKE, LocalFlags::ECHOKE),
        (Pty::PENDIN, LocalFlags::PENDIN),
    ] {
        modes.push((pty, u32::from(l.contains(flag))));
    }
    let o = t.output_flags;
    for (pty, flag) in [
        (Pty::OPOST, OutputFlags::OPOST),
        (Pty::ONLCR, OutputFlags::ONLCR),
        (Pty::OCRNL, OutputFlags::OCRNL),
        (Pty::ONOCR, OutputFlags::ONOCR),
        (Pty::ONLRET, OutputFlags::ONLRET),
    ] {
        modes.push((pty, u32::from(o.contains(flag))));
    }
    let c = t.control_flags;
    let size = c & ControlFlags::CSIZE;
    modes.push((Pty::CS7, u32::from(size == ControlFlags::CS7)));
    modes.push((Pty::CS8, u32::from(size == ControlFlags::CS8)));
    modes.push((Pty::PARENB, u32::from(c.contains(ControlFlags::PARENB))));
    modes.push((Pty::PARODD, u32::from(c.contains(ControlFlags::PARODD))));
    let ispeed = baud(termios::cfgetispeed(&t));
    let ospeed = baud(termios::cfgetospeed(&t));
    modes.push((Pty::TTY_OP_ISPEED, ispeed));
    modes.push((Pty::TTY_OP_OSPEED, ospeed));
    modes
}

fn baud(rate: termios::BaudRate) -> u32 {
    use termios::BaudRate as B;
    match rate {
        B::B9600 => 9600,
        B::B19200 => 19200,
        B::B57600 => 57600,
        B::B115200 => 115200,
        B::B230400 => 230400,
        _ => 38400,
    }
}

/// The terminal on stdin in raw mode; the previous settings come back on drop (and through
/// [`restore`] if the process ends another way).
pub struct RawMode {
    fd: RawFd,
    saved: Termios,
}

impl RawMode {
    /// Put the terminal on stdin into raw mode.
    pub fn enter() -> std::io::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        remember(stdin.as_raw_fd(), &saved);
        termios::tcsetattr(&stdin, SetArg::TCSADRAIN, &raw)?;
        Ok(RawMode {
            fd: stdin.as_raw_fd(),
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        if stdin.as_raw_fd() == self.fd {
            let _ = termios::tcsetattr(&stdin, SetArg::TCSADRAIN, &self.saved);
        }
        forget();
    }
}

fn remember(fd: RawFd, t: &Termios) {
    let raw: libc::termios = t.clone().into();
    *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some((fd, raw));
}

fn forget() {
    *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Put back terminal settings changed by [`RawMode`] or [`read_secret`], if any are still
/// changed. For exits that skip destructors (`process::exit`, signals, panics). Returns
/// whether there was something to put back.
pub fn restore() -> bool {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    match saved {
        Some((fd, t)) => {
            // SAFETY: `t` is a complete termios obtained from tcgetattr; tcsetattr only
            // reads it.
            unsafe {
                libc::tcsetattr(fd, libc::TCSADRAIN, &t);
            }
            true
        }
        None => false,
    }
}

/// Restore the terminal before a panic message is printed.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = restore();
        previous(info);
    }));
}

/// Whether a secret can be asked for: there is a controlling terminal.
pub fn can_prompt() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .is_ok()
}

/// Ask for a secret on `/dev/tty` with echo off; the trailing newline is removed.
pub fn read_secret(prompt: &str) -> std::io::Result<String> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let saved = termios::tcgetattr(&tty)?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    remember(tty.as_raw_fd(), &saved);
    let mut out = &tty;
    out.write_all(prompt.as_bytes())?;
    out.flush()?;
    termios::tcsetattr(&tty, SetArg::TCSAFLUSH, &quiet)?;
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    let _ = termios::tcsetattr(&tty, SetArg::TCSAFLUSH, &saved);
    forget();
    read?;
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    Ok(line)
}
