#!/usr/bin/env python3
"""WinRM interop driver for the e2e tests (tests/e2e/winrm_*.rs).

Reads a JSON array of operations on stdin, runs each against the agent with the real
pywinrm 0.5.0 / pypsrp 0.9.1 clients (or raw HTTP for the malformed and forged requests),
and prints one JSON array with one result object per operation. A client error that an
operation may legitimately meet (401, WS-Man fault, ...) is reported in the result as
`"error": {...}`; the Rust test decides whether it was expected. The script itself exits
non-zero, with a message on stderr, only when it is used wrongly or breaks.

Every operation takes the connection parameters it needs:
  pywinrm: endpoint (URL), transport, user, password, encryption (auto|always|never),
           op_timeout, read_timeout
  pypsrp:  port, ssl, auth, encryption, user, password, op_timeout
  raw:     port, tls, basic ([user, password])
"""

import base64
import hashlib
import http.client
import json
import os
import ssl
import sys
import time
import traceback
import uuid
import warnings
import xml.etree.ElementTree as ET

warnings.filterwarnings("ignore")

import winrm  # noqa: E402
from winrm.exceptions import WinRMOperationTimeoutError  # noqa: E402

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "x": "http://schemas.xmlsoap.org/ws/2004/09/transfer",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
    "f": "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault",
}
CMD_URI = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd"
SHELL = NS["rsp"]
CREATE = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create"
SOAP_CT = "application/soap+xml;charset=UTF-8"


def err(e):
    """A client exception as data."""
    return {
        "type": type(e).__name__,
        "message": str(e)[:1000],
        "code": getattr(e, "code", None),
        "wsman_fault_code": getattr(e, "wsman_fault_code", None),
        "wmierror_code": getattr(e, "wmierror_code", None),
        "fault_subcode": getattr(e, "fault_subcode", None),
    }


def text(b):
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


# ---------------------------------------------------------------------------------------
# pywinrm


def protocol(c):
    return winrm.Protocol(
        c["endpoint"],
        transport=c.get("transport", "basic"),
        username=c["user"],
        password=c["password"],
        server_cert_validation="ignore",
        message_encryption=c.get("encryption", "auto"),
        operation_timeout_sec=c.get("op_timeout", 20),
        read_timeout_sec=c.get("read_timeout", 30),
    )


def op_run_cmd(c):
    """winrm.Session(...).run_cmd(command, args) exactly as a user would."""
    s = winrm.Session(
        c["endpoint"],
        auth=(c["user"], c["password"]),
        transport=c.get("transport", "basic"),
        server_cert_validation="ignore",
        message_encryption=c.get("encryption", "auto"),
    )
    r = s.run_cmd(c["command"], c.get("args", []))
    return {"stdout": text(r.std_out), "stderr": text(r.std_err), "status": r.status_code}


def op_stdin(c):
    """Protocol.open_shell + run_command(console_mode_stdin=False) + Send chunks, the last
    with End, then the output."""
    p = protocol(c)
    shell = p.open_shell()
    cmd = p.run_command(shell, c["command"], c.get("args", []), console_mode_stdin=False)
    chunks = c["chunks"]
    for i, chunk in enumerate(chunks):
        p.send_command_input(shell, cmd, chunk.encode(), end=i == len(chunks) - 1)
    out, errout, rc = p.get_command_output(shell, cmd)
    p.cleanup_command(shell, cmd)
    p.close_shell(shell)
    return {"stdout": text(out), "stderr": text(errout), "status": rc}


class Recording:
    """Wraps Protocol.send_message to record the size of every response envelope."""

    def __init__(self, p):
        self.sizes = []
        inner = p.send_message

        def send(message):
            res = inner(message)
            self.sizes.append(len(res))
            return res

        p.send_message = send


def op_big_output(c):
    """A command writing `size` random bytes to stdout and their sha256 to stderr; the
    output is collected Receive by Receive, recording each response envelope's size."""
    size = c.get("size", 1 << 20)
    p = protocol(c)
    shell = p.open_shell()
    rec = Recording(p)
    line = (
        'f=$(mktemp) && head -c %d /dev/urandom > "$f" && sha256sum < "$f" >&2 '
        '&& cat "$f"; rc=$?; rm -f "$f"; exit $rc' % size
    )
    cmd = p.run_command(shell, line)
    rec.sizes.clear()
    out, errs, done, receives, rc = [], [], False, 0, None
    while not done:
        try:
            o, e, rc, done = p.get_command_output_raw(shell, cmd)
            receives += 1
            out.append(o)
            errs.append(e)
        except WinRMOperationTimeoutError:
            pass
    out = b"".join(out)
    p.cleanup_command(shell, cmd)
    p.close_shell(shell)
    return {
        "length": len(out),
        "sha256": hashlib.sha256(out).hexdigest(),
        "remote_sha256": text(b"".join(errs)).split(" ")[0].strip(),
        "status": rc,
        "receives": receives,
        "max_response_bytes": max(rec.sizes) if rec.sizes else 0,
    }


def op_interleaved_output(c):
    """A command interleaving `n` one-byte writes to stdout and to stderr (many tiny
    records); the output is collected Receive by Receive, recording each response's size."""
    n = c.get("n", 20000)
    p = protocol(c)
    shell = p.open_shell()
    rec = Recording(p)
    cmd = p.run_command(shell, 'i=0; while [ $i -lt %d ]; do printf a; printf b >&2; i=$((i+1)); done' % n)
    rec.sizes.clear()
    out, errs, done, rc = [], [], False, None
    while not done:
        try:
            o, e, rc, done = p.get_command_output_raw(shell, cmd)
            out.append(o)
            errs.append(e)
        except WinRMOperationTimeoutError:
            pass
    p.cleanup_command(shell, cmd)
    p.close_shell(shell)
    out, errs = b"".join(out), b"".join(errs)
    return {
        "stdout_ok": out == b"a" * n,
        "stderr_ok": errs == b"b" * n,
        "status": rc,
        "max_response_bytes": max(rec.sizes) if rec.sizes else 0,
    }


def ansible_send(p, shell, cmd, data, eof):
    """ansible-core's _winrm_send_input: the End attribute only on the last chunk."""
    rq = {
        "env:Envelope": p.build_wsman_header(
            resource_uri=CMD_URI, action=SHELL + "/Send", shell_id=shell
        )
    }
    stream = (
        rq["env:Envelope"]
        .setdefault("env:Body", {})
        .setdefault("rsp:Send", {})
        .setdefault("rsp:Stream", {})
    )
    stream["@Name"] = "stdin"
    stream["@CommandId"] = cmd
    stream["#text"] = base64.b64encode(data)
    if eof:
        stream["@End"] = "true"
    import xmltodict

    p.send_message(xmltodict.unparse(rq))


def op_ansible(c):
    """Ansible's winrm connection pattern: codepage 65001, console_mode_stdin=False,
    200000-byte stdin chunks without End until the last, then output, cleanup, close."""
    total = c.get("size", 1_012_345)
    chunk = c.get("chunk", 200_000)
    data = os.urandom(total)
    p = protocol(c)
    rec = Recording(p)
    shell = p.open_shell(codepage=65001)
    # Reads all of stdin first (as Ansible's exec wrapper does), then answers.
    line = (
        'f=$(mktemp) && cat > "$f" && sha256sum < "$f" >&2 && cat "$f"; '
        'rc=$?; rm -f "$f"; exit $rc'
    )
    cmd = p.run_command(shell, line, [], console_mode_stdin=False)
    sends = 0
    for off in range(0, total, chunk):
        ansible_send(p, shell, cmd, data[off : off + chunk], off + chunk >= total)
        sends += 1
    out, errout, rc = p.get_command_output(shell, cmd)
    p.cleanup_command(shell, cmd)
    p.close_shell(shell)
    return {
        "sent": total,
        "sends": sends,
        "sent_sha256": hashlib.sha256(data).hexdigest(),
        "length": len(out),
        "sha256": hashlib.sha256(out).hexdigest(),
        "remote_sha256": text(errout).split(" ")[0].strip(),
        "stderr": text(errout),
        "status": rc,
    }


def op_open_shells(c):
    """Open up to `count` shells and leave them open; stops at the first error."""
    p = protocol(c)
    shells = []
    try:
        for _ in range(c.get("count", 1)):
            kw = {}
            if c.get("idle_timeout") is not None:
                kw["idle_timeout"] = c["idle_timeout"]
            shells.append(p.open_shell(**kw))
    except Exception as e:
        return {"shells": shells, "error": err(e)}
    return {"shells": shells}


def op_close_shell(c):
    protocol(c).close_shell(c["shell"])
    return {"closed": c["shell"]}


def op_run_in_shell(c):
    """run_command + get_command_output + cleanup_command in an existing shell."""
    p = protocol(c)
    cmd = p.run_command(c["shell"], c["command"], c.get("args", []))
    out, errout, rc = p.get_command_output(c["shell"], cmd)
    p.cleanup_command(c["shell"], cmd)
    return {"stdout": text(out), "stderr": text(errout), "status": rc}


def op_shell_cmds(c):
    """open_shell(env_vars=...) (an endpoint is chosen with REMOTE_ENDPOINT there), then each
    of `commands` ([command, args]) with its output or its error, then close_shell."""
    p = protocol(c)
    try:
        shell = p.open_shell(env_vars=c.get("env"))
    except Exception as e:
        return {"error": err(e)}
    results = []
    for command, args in c["commands"]:
        try:
            cmd = p.run_command(shell, command, args)
            out, errout, rc = p.get_command_output(shell, cmd)
            p.cleanup_command(shell, cmd)
            results.append({"stdout": text(out), "stderr": text(errout), "status": rc})
        except Exception as e:
            results.append({"error": err(e)})
    p.close_shell(shell)
    return {"results": results}


def op_start_in_shell(c):
    """run_command in an existing shell, without receiving its output."""
    p = protocol(c)
    return {"command": p.run_command(c["shell"], c["command"], c.get("args", []))}


def op_receive_command(c):
    """get_command_output + cleanup_command for a command started earlier."""
    p = protocol(c)
    out, errout, rc = p.get_command_output(c["shell"], c["command_id"])
    p.cleanup_command(c["shell"], c["command_id"])
    return {"stdout": text(out), "stderr": text(errout), "status": rc}


def op_receive_timeout(c):
    """A command slower than OperationTimeout: every Receive that times out must be the
    TimedOut fault (pywinrm turns only code 2150858793 into WinRMOperationTimeoutError),
    and get_command_output's retry loop still ends with the output."""
    p = protocol(c)
    shell = p.open_shell()
    cmd = p.run_command(shell, c["command"])
    timeouts, waits, out, done, rc = 0, [], [], False, None
    start = time.monotonic()
    while not done:
        t0 = time.monotonic()
        try:
            o, _e, rc, done = p.get_command_output_raw(shell, cmd)
            out.append(o)
        except WinRMOperationTimeoutError:
            timeouts += 1
            waits.append(round(time.monotonic() - t0, 3))
    elapsed = time.monotonic() - start
    # The plain client call on a second slow command, to the end.
    cmd2 = p.run_command(shell, c.get("command2", c["command"]))
    out2, _e2, rc2 = p.get_command_output(shell, cmd2)
    p.cleanup_command(shell, cmd)
    p.cleanup_command(shell, cmd2)
    p.close_shell(shell)
    return {
        "timeouts": timeouts,
        "timeout_waits": waits,
        "elapsed": round(elapsed, 3),
        "stdout": text(b"".join(out)),
        "status": rc,
        "stdout2": text(out2),
        "status2": rc2,
    }


def op_commands_quota(c):
    """Start `count` long-running commands in one shell; stops at the first error."""
    p = protocol(c)
    shell = p.open_shell()
    started = []
    result = {}
    try:
        for _ in range(c["count"]):
            started.append(p.run_command(shell, c.get("command", "sleep 30")))
    except Exception as e:
        result["error"] = err(e)
    result["started"] = len(started)
    for cmd in started:
        p.cleanup_command(shell, cmd)
    # Once they are terminated, a new command runs.
    cmd = p.run_command(shell, "echo again")
    out, _e, rc = p.get_command_output(shell, cmd)
    result["after"] = {"stdout": text(out), "status": rc}
    p.close_shell(shell)
    return result


def op_concurrent(c):
    """`workers` threads, each with its own Protocol (own connection, own NTLM context),
    each opening a shell and running `rounds` commands whose output names the worker."""
    import threading

    results = [None] * c.get("workers", 4)

    def work(i):
        try:
            p = protocol(c)
            shell = p.open_shell()
            outs = []
            for n in range(c.get("rounds", 3)):
                cmd = p.run_command(shell, "sleep 0.2; seq 1 %d | sed 's/^/w%d-/'" % (1000 + n, i))
                out, _e, rc = p.get_command_output(shell, cmd)
                p.cleanup_command(shell, cmd)
                expected = "".join("w%d-%d\n" % (i, k) for k in range(1, 1001 + n))
                outs.append(out.decode() == expected and rc == 0)
            p.close_shell(shell)
            results[i] = {"ok": all(outs), "rounds": len(outs)}
        except Exception as e:
            results[i] = {"error": err(e)}

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(results))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return {"workers": results, "elapsed": round(time.monotonic() - t0, 3)}


# ---------------------------------------------------------------------------------------
# pypsrp


def psrp_wsman(c):
    from pypsrp.wsman import WSMan

    return WSMan(
        "127.0.0.1",
        port=c["port"],
        username=c["user"],
        password=c["password"],
        ssl=c.get("ssl", False),
        auth=c.get("auth", "negotiate"),
        encryption=c.get("encryption", "auto"),
        cert_validation=False,
        operation_timeout=c.get("op_timeout", 20),
        read_timeout=c.get("read_timeout", 30),
    )


def op_psrp_cmd(c):
    from pypsrp.client import Client

    client = Client(
        "127.0.0.1",
        port=c["port"],
        username=c["user"],
        password=c["password"],
        ssl=c.get("ssl", False),
        auth=c.get("auth", "negotiate"),
        encryption=c.get("encryption", "auto"),
        cert_validation=False,
    )
    out, errout, rc = client.execute_cmd(c["command"])
    return {"stdout": out, "stderr": errout, "status": rc}


def op_psrp_shell_cmds(c):
    """pypsrp WinRS on `resource_uri` (default the cmd shell; `.../shell/cmd/NAME` is the cmd
    shell of endpoint NAME), then each of `commands` ([command, args]) with its output or its
    error, then close."""
    from pypsrp.shell import Process, WinRS

    shell = WinRS(psrp_wsman(c), resource_uri=c.get("resource_uri", CMD_URI))
    try:
        shell.open()
    except Exception as e:
        return {"error": err(e)}
    results = []
    for command, args in c["commands"]:
        try:
            proc = Process(shell, command, args)
            proc.invoke()
            results.append({"stdout": text(proc.stdout), "stderr": text(proc.stderr), "status": proc.rc})
        except Exception as e:
            results.append({"error": err(e)})
    shell.close()
    return {"results": results}


def op_psrp_process(c):
    """WinRS + Process with a short OperationTimeout: a command slower than it, one with
    per-argument Arguments and stdin, polls with an explicit timeout, and ctrl_c stopping a
    running `sleep 100`."""
    from pypsrp.shell import Process, SignalCode, WinRS

    wsman = psrp_wsman(c)
    res = {}
    with WinRS(wsman, environment={"GREETING": "hi there"}) as shell:
        t0 = time.monotonic()
        slow = Process(shell, "sleep %s; echo $GREETING" % c.get("slow_secs", 3))
        slow.invoke()
        res["slow"] = {
            "stdout": text(slow.stdout),
            "status": slow.rc,
            "elapsed": round(time.monotonic() - t0, 3),
        }
        slow.signal(SignalCode.TERMINATE)

        cat = Process(shell, "tr", ["a-z", "A-Z"])
        cat.begin_invoke()
        cat.send(b"stdin via pypsrp\n", end=True)
        cat.end_invoke()
        res["stdin"] = {"stdout": text(cat.stdout), "status": cat.rc}
        cat.signal(SignalCode.TERMINATE)

        sleeper = Process(shell, "sleep 100")
        sleeper.begin_invoke()
        sleeper.poll_invoke(timeout=1)  # nothing to say yet: a TimedOut, ignored
        res["sleeper_state_before"] = sleeper.state.rsplit("/", 1)[-1]
        t0 = time.monotonic()
        sleeper.signal(SignalCode.CTRL_C)
        deadline = t0 + c.get("ctrl_c_deadline", 15)
        while sleeper.state != "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done":
            if time.monotonic() > deadline:
                break
            sleeper.poll_invoke(timeout=1)
        res["ctrl_c"] = {
            "state": sleeper.state.rsplit("/", 1)[-1],
            "status": sleeper.rc,
            "elapsed": round(time.monotonic() - t0, 3),
        }
        sleeper.signal(SignalCode.TERMINATE)
    return res


# ---------------------------------------------------------------------------------------
# Raw HTTP


def envelope(
    action,
    resource_uri=CMD_URI,
    shell_id=None,
    body="",
    env_ns=NS["s"],
    addr_ns=NS["a"],
    timeout="PT20S",
    message_id=None,
):
    """A WS-Management request envelope in the shape of spec §7.1."""
    message_id = message_id or "uuid:%s" % uuid.uuid4()
    selector = (
        '<w:SelectorSet><w:Selector Name="ShellId">%s</w:Selector></w:SelectorSet>' % shell_id
        if shell_id
        else ""
    )
    return (
        '<s:Envelope xmlns:s="%s" xmlns:a="%s" xmlns:w="%s" xmlns:rsp="%s">'
        "<s:Header>"
        "<a:To>http://windows-host:5985/wsman</a:To>"
        '<a:ReplyTo><a:Address mustUnderstand="true">'
        "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:Address></a:ReplyTo>"
        '<w:MaxEnvelopeSize mustUnderstand="true">153600</w:MaxEnvelopeSize>'
        "<a:MessageID>%s</a:MessageID>"
        "<w:OperationTimeout>%s</w:OperationTimeout>"
        '<w:ResourceURI mustUnderstand="true">%s</w:ResourceURI>'
        '<a:Action mustUnderstand="true">%s</a:Action>'
        "%s"
        "</s:Header><s:Body>%s</s:Body></s:Envelope>"
        % (env_ns, addr_ns, NS["w"], NS["rsp"], message_id, timeout, resource_uri, action, selector, body)
    )


CREATE_BODY = (
    "<rsp:Shell><rsp:InputStreams>stdin</rsp:InputStreams>"
    "<rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>"
)


def make_body(spec):
    kind = spec.get("kind", "text")
    if kind == "text":
        return spec["text"].encode()
    if kind == "envelope":
        kw = {k: spec[k] for k in ("resource_uri", "shell_id", "body", "env_ns", "addr_ns", "timeout") if k in spec}
        return envelope(spec.get("action", CREATE), **kw).encode()
    if kind == "create":
        return envelope(CREATE, body=CREATE_BODY).encode()
    if kind == "nested":
        depth = spec["depth"]
        inner = "<a>" * depth + ("</a>" * depth if spec.get("closed") else "")
        return envelope(CREATE, body=inner).encode()
    if kind == "send_big":
        stream = base64.b64encode(os.urandom(spec["raw_bytes"])).decode()
        body = (
            '<rsp:Send><rsp:Stream Name="stdin" CommandId="%s">%s</rsp:Stream></rsp:Send>'
            % (str(uuid.uuid4()).upper(), stream)
        )
        return envelope(SHELL + "/Send", shell_id=spec.get("shell_id", str(uuid.uuid4()).upper()), body=body).encode()
    if kind == "filler":
        return b"<" + b"x" * (spec["size"] - 1)
    raise SystemExit("winrm_client.py: unknown body kind %r" % kind)


def connect(c):
    if c.get("tls"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection("127.0.0.1", c["port"], context=ctx, timeout=c.get("timeout", 30))
    return http.client.HTTPConnection("127.0.0.1", c["port"], timeout=c.get("timeout", 30))


def parse_fault(body):
    """The WSManFault Code, SOAP subcode and reason of a fault body, if any."""
    out = {}
    try:
        root = ET.fromstring(body)
    except Exception:
        return out
    fault = root.find("s:Body/s:Fault", NS)
    if fault is None:
        return out
    code = fault.find("s:Detail/f:WSManFault", NS)
    if code is not None and "Code" in code.attrib:
        out["fault_code"] = int(code.attrib["Code"])
    sub = fault.find("s:Code/s:Subcode/s:Value", NS)
    if sub is not None:
        out["fault_subcode"] = sub.text
    val = fault.find("s:Code/s:Value", NS)
    if val is not None:
        out["fault_value"] = val.text
    reason = fault.find("s:Reason/s:Text", NS)
    if reason is not None:
        out["fault_reason"] = reason.text
    return out


def send_raw(conn, req, auth_header):
    """One request on `conn`; the response as data, or the connection error."""
    body = make_body(req.get("body", {"kind": "text", "text": ""}))
    headers = {"Content-Type": req.get("content_type", SOAP_CT)}
    if auth_header:
        headers["Authorization"] = auth_header
    headers.update(req.get("headers", {}))
    t0 = time.monotonic()
    try:
        local_port = None
        conn.request(req.get("method", "POST"), req.get("path", "/wsman"), body=body, headers=headers)
        local_port = conn.sock.getsockname()[1] if conn.sock else None
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        return {"error": err(e), "sent_bytes": len(body), "elapsed": round(time.monotonic() - t0, 3)}
    r = {
        "status": resp.status,
        "content_type": resp.getheader("Content-Type"),
        "www_authenticate": resp.getheader("WWW-Authenticate"),
        "body": data[:4000].decode("utf-8", "replace"),
        "body_length": len(data),
        "sent_bytes": len(body),
        "elapsed": round(time.monotonic() - t0, 3),
        "local_port": local_port,
    }
    r.update(parse_fault(data))
    if resp.will_close:
        conn.close()
    return r


def op_raw(c):
    """Raw HTTP requests on one keep-alive connection (reconnecting after a close)."""
    auth = None
    if c.get("basic"):
        auth = "Basic " + base64.b64encode(("%s:%s" % tuple(c["basic"])).encode()).decode()
    conn = connect(c)
    results = [send_raw(conn, req, auth) for req in c["requests"]]
    conn.close()
    return {"responses": results}


# ---------------------------------------------------------------------------------------
# A forged NTLM AUTHENTICATE (spec §5.7 pitfall 2)


def op_ntlm_forged(c):
    """Three NTLM legs under `Authorization: Negotiate` on one keep-alive connection, with an
    AUTHENTICATE message built by hand: NTLMv2 response computed from `password`, AV pairs
    per `variant` ("flags_zero": MsvAvFlags = 0, "no_flags": no MsvAvFlags pair; both with an
    all-zero MIC field; "mic": the MIC bit set and the real MIC, as a client would), then a
    plaintext SOAP Create with no Authorization on the same connection."""
    import spnego
    from requests_ntlm.requests_ntlm import _get_certificate_hash
    from spnego._ntlm_raw.crypto import compute_response_v2, hmac_md5, ntowfv1, ntowfv2, rc4k
    from spnego._ntlm_raw.messages import (
        AvFlags,
        AvId,
        Authenticate,
        Challenge,
        FileTime,
        NegotiateFlags,
        TargetInfo,
        Version,
    )
    from spnego.channel_bindings import GssChannelBindings

    user, domain, password = c["user"], c.get("domain", ""), c["password"]
    variant = c["variant"]
    conn = connect(c)
    conn.connect()
    cbt = None
    if c.get("tls"):
        der = conn.sock.getpeercert(binary_form=True)
        cbt = GssChannelBindings(application_data=b"tls-server-end-point:" + _get_certificate_hash(der))

    ctx = spnego.client(user, password, hostname="127.0.0.1", service="HTTP", protocol="ntlm")
    negotiate = ctx.step()
    soap = make_body({"kind": "create"})
    final_body = soap if c.get("final_body", "soap") == "soap" else b""

    def post(auth, body, raw_auth=None):
        headers = {"Content-Type": SOAP_CT, "Connection": "Keep-Alive"}
        if auth:
            headers["Authorization"] = "Negotiate " + base64.b64encode(auth).decode()
        if raw_auth:
            headers["Authorization"] = raw_auth
        try:
            conn.request("POST", "/wsman", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            return {"error": err(e)}, None
        r = {"status": resp.status, "www_authenticate": resp.getheader("WWW-Authenticate")}
        r.update(parse_fault(data))
        return r, resp

    legs = {}
    legs["negotiate"], resp = post(negotiate, soap)
    challenge_b64 = None
    for part in (legs["negotiate"].get("www_authenticate") or "").split(","):
        part = part.strip()
        if part.startswith("Negotiate ") or part.startswith("NTLM "):
            challenge_b64 = part.split(" ", 1)[1].strip()
    if legs["negotiate"].get("status") != 401 or not challenge_b64:
        return {"legs": legs, "note": "no NTLM challenge"}
    challenge_bytes = base64.b64decode(challenge_b64)
    challenge = Challenge.unpack(challenge_bytes)

    ti = challenge.target_info.copy() if challenge.target_info else TargetInfo()
    stamp = ti[AvId.timestamp] if AvId.timestamp in ti else FileTime.now()
    if cbt is not None:
        from spnego._ntlm_raw.crypto import md5

        ti[AvId.channel_bindings] = md5(cbt.pack())
    ti[AvId.target_name] = "HTTP/127.0.0.1"
    if variant == "flags_zero":
        ti[AvId.flags] = AvFlags(0)
    elif variant == "no_flags":
        ti.pop(AvId.flags, None)
    elif variant == "mic":
        ti[AvId.flags] = ti.get(AvId.flags, AvFlags(0)) | AvFlags.mic
    else:
        raise SystemExit("winrm_client.py: unknown variant %r" % variant)

    response_key = ntowfv2(user, ntowfv1(password), domain)
    nt, _lm, key_exchange_key = compute_response_v2(
        response_key, challenge.server_challenge, os.urandom(8), stamp, ti
    )
    lm = b"\x00" * 24
    flags = challenge.flags
    kw = {"domain_name": domain, "username": user}
    session_key = key_exchange_key
    if flags & NegotiateFlags.key_exch and flags & (NegotiateFlags.sign | NegotiateFlags.seal):
        session_key = os.urandom(16)
        kw["encrypted_session_key"] = rc4k(key_exchange_key, session_key)
    if flags & NegotiateFlags.version:
        kw["version"] = Version.get_current()
        kw["workstation"] = "TESTHOST"
    auth = Authenticate(flags, lm, nt, **kw)
    if variant == "mic":
        auth.mic = hmac_md5(session_key, negotiate + challenge_bytes + auth.pack())
    legs["authenticate"], _ = post(auth.pack(), final_body)
    legs["followup"], _ = post(None, soap)
    # Optionally: a failed new login on the same connection (any Authorization header),
    # then a request without one, which must not be served under the earlier login.
    for i, raw in enumerate(c.get("reauth", [])):
        legs["reauth%d" % i], _ = post(None, soap, raw_auth=raw)
        legs["after_reauth%d" % i], _ = post(None, soap)
    conn.close()
    return {"legs": legs}


OPS = {
    name[3:]: fn for name, fn in globals().items() if name.startswith("op_") and callable(fn)
}


def main():
    try:
        ops = json.load(sys.stdin)
    except ValueError as e:
        sys.exit("winrm_client.py: stdin must be a JSON array of operations: %s" % e)
    if not isinstance(ops, list):
        sys.exit("winrm_client.py: stdin must be a JSON array of operations")
    results = []
    for o in ops:
        name = o.get("op")
        if name not in OPS:
            sys.exit("winrm_client.py: unknown op %r (known: %s)" % (name, ", ".join(sorted(OPS))))
        t0 = time.monotonic()
        try:
            r = OPS[name](o)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:
            r = {"error": err(e), "traceback": traceback.format_exc()[-3000:]}
        r["op"] = name
        if "label" in o:
            r["label"] = o["label"]
        r["seconds"] = round(time.monotonic() - t0, 3)
        results.append(r)
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
