"""`python -m relay` is the `mailrelay` command."""

from relay.cli import main

main()
