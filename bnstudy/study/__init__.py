"""The study's drivers: reproduce (the paper's claims), findings (open questions), grid."""
