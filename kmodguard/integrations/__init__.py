"""kmodguard inside other programs: the dnf plugin (dnf_plugin.py). The kernel-install plugin and
the Ansible facts script are small shell scripts in units/ that call the command line."""
