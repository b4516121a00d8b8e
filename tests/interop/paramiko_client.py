"""paramiko against remote-agent: password and key logins, exec with exit code and stderr,
stdin, and a refused login. Exits non-zero with a message on the first mismatch."""
import sys

import paramiko


def connect(port, user, password=None, key_file=None):
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    c.connect("127.0.0.1", port=port, username=user, password=password,
              key_filename=key_file, allow_agent=False, look_for_keys=False, timeout=15)
    return c


def check(cond, what):
    if not cond:
        print("FAIL:", what)
        sys.exit(1)


def main():
    port, key_file = int(sys.argv[1]), sys.argv[2]
    c = connect(port, "alice", password="pw-alice")
    _, out, err = c.exec_command("echo hello; echo oops >&2; exit 5")
    check(out.read() == b"hello\n", "stdout")
    check(err.read() == b"oops\n", "stderr")
    check(out.channel.recv_exit_status() == 5, "exit status")
    stdin, out, _ = c.exec_command("tr a-z A-Z")
    stdin.write("paramiko\n")
    stdin.channel.shutdown_write()
    check(out.read() == b"PARAMIKO\n", "stdin through tr")
    check(out.channel.recv_exit_status() == 0, "exit status 0")
    c.close()

    c = connect(port, "alice", key_file=key_file)
    _, out, _ = c.exec_command("echo key-ok")
    check(out.read() == b"key-ok\n", "key login")
    c.close()

    try:
        connect(port, "alice", password="nope")
        check(False, "wrong password accepted")
    except paramiko.AuthenticationException:
        pass
    print("OK")


main()
