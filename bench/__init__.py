"""Benchmarks of mailrelay side by side with Postfix (not part of the test suite): bench/README.md."""
