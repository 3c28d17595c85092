"""mailrelay's data plane: the relay process, its SMTP front, spool, scheduler and delivery."""

__version__ = "0.1.0"
