//! Terminal modes sent with an SSH `pty-req` (RFC 4254 §8), applied to the new terminal with
//! termios, so that the remote line discipline behaves like the client's (erase key, ^C, …).

use std::os::fd::AsFd;

use nix::sys::termios::{
    self, ControlFlags, InputFlags, LocalFlags, OutputFlags, SetArg, SpecialCharacterIndices as C,
};
use russh::Pty;

/// Apply `modes` to the terminal `fd`. Unknown modes and values are ignored; a failure to
/// read or write the settings leaves the terminal at the kernel's defaults.
pub fn apply(fd: &impl AsFd, modes: &[(Pty, u32)]) {
    let Ok(mut t) = termios::tcgetattr(fd) else {
        return;
    };
    for &(mode, value) in modes {
        let on = value != 0;
        let cc = |t: &mut termios::Termios, i: C| {
            // 255 means "disabled" in OpenSSH's encoding; _POSIX_VDISABLE is 0 on Linux.
            t.control_chars[i as usize] = if value >= 255 { 0 } else { value as u8 };
        };
        let iflag = |t: &mut termios::Termios, f: InputFlags| t.input_flags.set(f, on);
        let lflag = |t: &mut termios::Termios, f: LocalFlags| t.local_flags.set(f, on);
        let oflag = |t: &mut termios::Termios, f: OutputFlags| t.output_flags.set(f, on);
        let cflag = |t: &mut termios::Termios, f: ControlFlags| t.control_flags.set(f, on);
        match mode {
            Pty::VINTR => cc(&mut t, C::VINTR),
            Pty::VQUIT => cc(&mut t, C::VQUIT),
            Pty::VERASE => cc(&mut t, C::VERASE),
            Pty::VKILL => cc(&mut t, C::VKILL),
            Pty::VEOF => cc(&mut t, C::VEOF),
            Pty::VEOL => cc(&mut t, C::VEOL),
            Pty::VEOL2 => cc(&mut t, C::VEOL2),
            Pty::VSTART => cc(&mut t, C::VSTART),
            Pty::VSTOP => cc(&mut t, C::VSTOP),
            Pty::VSUSP => cc(&mut t, C::VSUSP),
            Pty::VREPRINT => cc(&mut t, C::VREPRINT),
            Pty::VWERASE => cc(&mut t, C::VWERASE),
            Pty::VLNEXT => cc(&mut t, C::VLNEXT),
            Pty::VDISCARD => cc(&mut t, C::VDISCARD),
            Pty::IGNPAR => iflag(&mut t, InputFlags::IGNPAR),
            Pty::PARMRK => iflag(&mut t, InputFlags::PARMRK),
            Pty::INPCK => iflag(&mut t, InputFlags::INPCK),
            Pty::ISTRIP => iflag(&mut t, InputFlags::ISTRIP),
            Pty::INLCR => iflag(&mut t, InputFlags::INLCR),
            Pty::IGNCR => iflag(&mut t, InputFlags::IGNCR),
            Pty::ICRNL => iflag(&mut t, InputFlags::ICRNL),
            Pty::IXON => iflag(&mut t, InputFlags::IXON),
            Pty::IXANY => iflag(&mut t, InputFlags::IXANY),
            Pty::IXOFF => iflag(&mut t, InputFlags::IXOFF),
            Pty::IMAXBEL => iflag(&mut t, InputFlags::IMAXBEL),
            Pty::IUTF8 => iflag(&mut t, InputFlags::IUTF8),
            Pty::ISIG => lflag(&mut t, LocalFlags::ISIG),
            Pty::ICANON => lflag(&mut t, LocalFlags::ICANON),
            Pty::ECHO => lflag(&mut t, LocalFlags::ECHO),
            Pty::ECHOE => lflag(&mut t, LocalFlags::ECHOE),
            Pty::ECHOK => lflag(&mut t, LocalFlags::ECHOK),
            Pty::ECHONL => lflag(&mut t, LocalFlags::ECHONL),
            Pty::NOFLSH => lflag(&mut t, LocalFlags::NOFLSH),
            Pty::TOSTOP => lflag(&mut t, LocalFlags::TOSTOP),
            Pty::IEXTEN => lflag(&mut t, LocalFlags::IEXTEN),
            Pty::ECHOCTL => lflag(&mut t, LocalFlags::ECHOCTL),
            Pty::ECHOKE => lflag(&mut t, LocalFlags::ECHOKE),
            Pty::PENDIN => lflag(&mut t, LocalFlags::PENDIN),
            Pty::OPOST => oflag(&mut t, OutputFlags::OPOST),
            Pty::ONLCR => oflag(&mut t, OutputFlags::ONLCR),
            Pty::OCRNL => oflag(&mut t, OutputFlags::OCRNL),
            Pty::ONOCR => oflag(&mut t, OutputFlags::ONOCR),
            Pty::ONLRET => oflag(&mut t, OutputFlags::ONLRET),
            Pty::CS7 if on => {
                t.control_flags.remove(ControlFlags::CSIZE);
                t.control_flags.insert(ControlFlags::CS7);
            }
            Pty::CS8 if on => {
                t.control_flags.remove(ControlFlags::CSIZE);
                t.control_flags.insert(ControlFlags::CS8);
            }
            Pty::PARENB => cflag(&mut t, ControlFlags::PARENB),
            Pty::PARODD => cflag(&mut t, ControlFlags::PARODD),
            _ => {}
        }
    }
    let _ = termios::tcsetattr(fd, SetArg::TCSANOW, &t);
}
