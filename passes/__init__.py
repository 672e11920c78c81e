"""FX passes that find attention sites and rewrite them into DGA (installed as ``dga_compile.passes``)."""
