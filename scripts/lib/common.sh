# Shell pieces shared by devshare's scripts (sourced, not run).

# Prints the Debian mirror this machine's apt uses: the URIs of the deb822 stanza in
# /etc/apt/sources.list.d/debian.sources that carries the release itself (a suite without a
# '-', not -updates/-security). The repository never names a mirror; it asks the machine.
debian_mirror() {
    local sources=/etc/apt/sources.list.d/debian.sources
    [ -r "$sources" ] || return 1
    awk '
        function flush() {
            if (uris != "" && main && found == "") found = uris
            if (uris != "" && first == "") first = uris
            uris = ""; main = 0
        }
        /^[[:space:]]*$/ { flush(); next }
        /^URIs:/ { uris = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i !~ /-/) main = 1 }
        END { flush(); if (found != "") print found; else if (first != "") print first; else exit 1 }
    ' "$sources"
}

# Prints the path of the env file written by setup.sh.
devshare_env_file() {
    echo "${DEVSHARE_CACHE:-/var/cache/devshare}/env"
}
