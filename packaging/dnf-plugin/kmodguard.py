# dnf 4 plugin shim, installed as %{python3_sitelib}/dnf-plugins/kmodguard.py: dnf imports every
# module of its plugin directory and loads the dnf.Plugin subclasses it finds there. The plugin's
# code lives in the kmodguard package (kmodguard/integrations/dnf_plugin.py); this only re-exports it.
from kmodguard.integrations.dnf_plugin import Kmodguard  # noqa: F401
