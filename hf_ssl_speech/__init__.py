"""hf_ssl_speech: self-supervised Conformer / FastConformer speech encoders as transformers classes.

Importing the package registers the classes with the transformers Auto factories.
"""

from transformers import AutoConfig

from .configuration_conformer_ssl import ConformerSslConfig

AutoConfig.register("conformer_ssl", ConformerSslConfig)

__all__ = ["ConformerSslConfig"]
__version__ = "0.1.0"
