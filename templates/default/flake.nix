{
  description = "Two NixOS microVMs for nvmm: a web server and a client";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  # Plain NixOS configurations: `nvmm boot NAME` adds nvmm's guest module to
  # nixosConfigurations.NAME itself, which is where the nvmm.* options below come from. To
  # evaluate or build them without nvmm, add an `nvmm` input and put
  # nvmm.nixosModules.default in `modules`; nvmm then boots them the same way.
  outputs =
    { nixpkgs, ... }:
    {
      nixosConfigurations = {
        server = nixpkgs.lib.nixosSystem {
          modules = [
            {
              nixpkgs.hostPlatform = "x86_64-linux";
              networking.hostName = "server";

              services.nginx = {
                enable = true;
                virtualHosts.server = {
                  default = true;
                  locations."/".return = "200 'hello from server\\n'";
                  extraConfig = "default_type text/plain;";
                };
              };
              networking.firewall.allowedTCPPorts = [ 80 ];

              # http://localhost:8080 on the host reaches nginx while the VM runs.
              nvmm.forwardPorts = [
                {
                  host = 8080;
                  guest = 80;
                }
              ];

              system.stateVersion = "25.05";
            }
          ];
        };

        client = nixpkgs.lib.nixosSystem {
          modules = [
            (
              { pkgs, ... }:
              {
                nixpkgs.hostPlatform = "x86_64-linux";
                networking.hostName = "client";
                environment.systemPackages = [ pkgs.curl ];
                system.stateVersion = "25.05";
              }
            )
          ];
        };
      };
    };
}
