# Shared pieces of the benchmark scripts (bash; sourced after the script defines its own
# `log` and `die`).

# Make sure OS user $1 exists (created with a home and /bin/sh as its login shell when
# missing; needs root).
ensure_os_user() {
    local user=$1
    getent passwd "$user" >/dev/null && return 0
    command -v useradd >/dev/null || die "OS user $user is missing and useradd is not available (apt-get install passwd)"
    log "creating OS user $user (login shell /bin/sh): useradd --create-home --shell /bin/sh $user"
    useradd --create-home --shell /bin/sh "$user" || die "useradd $user failed"
}
