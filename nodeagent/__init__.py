"""gridckpt node agent: launches units as process trees and drives their checkpointers."""
