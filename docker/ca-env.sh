# shellcheck shell=sh
# Sourced (never copied into the image) by the Dockerfile's download steps, through a bind mount.
#
# With a BuildKit secret `extra_ca` (a PEM file holding one or more CA certificates, e.g. a
# company's TLS-intercepting proxy CA), build a bundle = the image's own CAs + the extra CA in a
# tmpfs mounted at /run/extra-ca, and point pip, requests, curl and apt (through APT_CONFIG) at it.
# Both the secret and the tmpfs exist only while that RUN step runs, so no certificate ends up in a
# layer.
# Without the secret this does nothing.
if [ -s /run/secrets/extra_ca ]; then
    _bundle=/run/extra-ca/bundle.pem
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra_ca >"$_bundle"
    else
        cat /run/secrets/extra_ca >"$_bundle"
    fi
    export PIP_CERT="$_bundle" SSL_CERT_FILE="$_bundle" REQUESTS_CA_BUNDLE="$_bundle" CURL_CA_BUNDLE="$_bundle"
    echo "Acquire::https::CAInfo \"$_bundle\";" >/run/extra-ca/apt.conf
    export APT_CONFIG=/run/extra-ca/apt.conf
    echo "extra CA: using build secret extra_ca for downloads in this step"
fi
