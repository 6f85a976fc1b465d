"""hf_ssl_speech: self-supervised Conformer / FastConformer speech encoders as transformers classes.

Importing the package registers the classes with the transformers Auto factories, and marks them so that
`save_pretrained` writes their code next to the weights (loadable with `trust_remote_code=True` where the
package is not installed).
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForCTC,
    AutoModelForPreTraining,
    AutoProcessor,
)

from .configuration_conformer_ssl import ConformerSslConfig
from .feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from .modeling_conformer_ssl import (
    ConformerSslForCTC,
    ConformerSslForPreTraining,
    ConformerSslForPreTrainingOutput,
    ConformerSslForSequenceClassification,
    ConformerSslModel,
    ConformerSslPreTrainedModel,
)
from .processing_conformer_ssl_lm import ConformerSslLmProcessorKey, ConformerSslProcessorWithLM

AutoConfig.register("conformer_ssl", ConformerSslConfig)
AutoFeatureExtractor.register(ConformerSslConfig, ConformerSslFeatureExtractor)
AutoModel.register(ConformerSslConfig, ConformerSslModel)
AutoModelForCTC.register(ConformerSslConfig, ConformerSslForCTC)
AutoModelForAudioClassification.register(ConformerSslConfig, ConformerSslForSequenceClassification)
AutoModelForPreTraining.register(ConformerSslConfig, ConformerSslForPreTraining)
AutoProcessor.register(ConformerSslLmProcessorKey, ConformerSslProcessorWithLM)

ConformerSslConfig.register_for_auto_class()
ConformerSslFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
ConformerSslModel.register_for_auto_class("AutoModel")
ConformerSslForCTC.register_for_auto_class("AutoModelForCTC")
ConformerSslForSequenceClassification.register_for_auto_class("AutoModelForAudioClassification")
ConformerSslForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "ConformerSslConfig",
    "ConformerSslFeatureExtractor",
    "ConformerSslForCTC",
    "ConformerSslProcessorWithLM",
    "ConformerSslForPreTraining",
    "ConformerSslForPreTrainingOutput",
    "ConformerSslForSequenceClassification",
    "ConformerSslModel",
    "ConformerSslPreTrainedModel",
]
__version__ = "0.1.0"
